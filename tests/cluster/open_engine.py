"""A stand-in engine that serves like vLLM without hpc-serve's key middleware: /health, the model
in /v1/models, and 200 on every other path. The agent must refuse to publish it."""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()


class Handler(BaseHTTPRequestHandler):
    def answer(self) -> None:
        body = json.dumps({"data": [{"id": args.model}]} if self.path == "/v1/models" else {}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *_):
        pass


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
