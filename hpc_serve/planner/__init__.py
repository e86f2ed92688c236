"""What a deployment is and how it runs, computed before anything is submitted (pure, stdlib only).

settings -> spec -> layout -> launch plan: every node's role, ports, environment and exact argv.
"""
