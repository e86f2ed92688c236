"""`hpc-serve fetch` and offline nodes (`--offline`, `--hf-home`): hpc-serve's own logic.

No hub is reachable here. The download itself is huggingface_hub's; what is ours is tested with
huggingface_hub against a cache laid out as the hub lays it out, and against a stand-in for the
hub (HF_ENDPOINT) that answers as huggingface.co does when it refuses: a gated model, an unknown
one. The real cluster's side (nothing queued; a job that serves from the cache offline) is in
tests/engine/test_engine.py.
"""

import json
import os
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "hpc_serve"]
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = f"test-token-{uuid.uuid4().hex}"  # made here: nothing secret-looking in the tree


def run(*args, env=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": os.path.dirname(sys.executable), **(env or {})})


def lay_out(hf_home: Path, model: str) -> Path:
    """``model`` in ``hf_home``'s cache as huggingface_hub writes it: blobs, a snapshot, refs/main."""
    repo = hf_home / "hub" / f"models--{model.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "abc").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", "abc"))
    (repo / "blobs" / "def").write_bytes(b"\0" * 64)
    (snapshot / "model.safetensors").symlink_to(Path("..", "..", "blobs", "def"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


class Refusing:
    """A stand-in for huggingface.co that refuses every request with ``status`` and ``error_code``
    (its X-Error-Code header, which huggingface_hub reads) and records the Authorization it got."""

    def __init__(self, status: int, error_code: str) -> None:
        seen = self.authorizations = []

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                seen.append(self.headers.get("Authorization", ""))
                body = json.dumps({"error": f"{error_code}: refused"}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", "Access to this model is restricted.")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = _refuse

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def hub(request):
    status, code = request.param
    server = Refusing(status, code)
    yield server
    server.close()


def test_a_model_in_the_cache_is_found_there_without_the_hub(tmp_path):
    snapshot = lay_out(tmp_path / "hf", "org/tiny")
    done = run("fetch", "org/tiny", "--hf-home", str(tmp_path / "hf"), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)
    assert done.stderr.strip() == (f"in the cache; serve it with: hpc-serve submit org/tiny --hf-home "
                                   f"{tmp_path / 'hf'} --offline ...")


def test_the_profiles_hf_home_is_where_fetch_looks(tmp_path, isolated_config):
    snapshot = lay_out(tmp_path / "shared-hf", "org/tiny")
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[profiles.cluster]\nhf_home = "{tmp_path / "shared-hf"}"\n')
    done = run("fetch", "org/tiny", "--profile", "cluster", env={"HF_HUB_OFFLINE": "1"})
    assert (done.returncode, done.stdout.strip()) == (0, str(snapshot)), done.stderr


def test_offline_and_not_in_the_cache_says_to_fetch_where_the_hub_is_reachable(tmp_path):
    done = run("fetch", "org/absent", "--hf-home", str(tmp_path / "hf"), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: org/absent is not in the cache at {tmp_path / 'hf'}, and the hub cannot be "
                           "reached from here (offline, or HF_HUB_OFFLINE is set).\nRun hpc-serve fetch on a node "
                           "that reaches huggingface.co (a login or transfer node).\n")


@pytest.mark.parametrize("hub", [(403, "GatedRepo")], indirect=True)
def test_a_gated_model_says_accept_its_terms_and_never_shows_the_token(tmp_path, hub):
    done = run("fetch", "meta-llama/Llama-3.1-8B", "--hf-home", str(tmp_path / "hf"),
               env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: meta-llama/Llama-3.1-8B is gated on Hugging Face"), done.stderr
    assert "https://huggingface.co/meta-llama/Llama-3.1-8B" in done.stderr and "HF_TOKEN" in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert f"Bearer {TOKEN}" in hub.authorizations  # the token from the environment was offered to the hub


@pytest.mark.parametrize("hub", [(401, "RepoNotFound")], indirect=True)
def test_an_unknown_model_is_named(tmp_path, hub):
    done = run("fetch", "org/no-such-model", "--hf-home", str(tmp_path / "hf"), env={"HF_ENDPOINT": hub.url})
    assert done.returncode == 2
    assert done.stderr.startswith("error: There is no model 'org/no-such-model' on Hugging Face"), done.stderr


@pytest.mark.parametrize("hub", [(404, "RevisionNotFound")], indirect=True)
def test_a_revision_the_model_lacks_is_named(tmp_path, hub):
    done = run("fetch", "org/tiny", "--revision", "v9", "--hf-home", str(tmp_path / "hf"), env={"HF_ENDPOINT": hub.url})
    assert done.returncode == 2
    assert done.stderr == "error: org/tiny has no revision 'v9'.\nGive a branch, tag or commit it has.\n", done.stderr


def test_no_hub_reachable_and_nothing_cached_says_where_to_run_it(tmp_path):
    closed = Refusing(500, "x")
    closed.close()
    closed.server.server_close()  # nothing listens there now: connection refused
    done = run("fetch", "org/tiny", "--hf-home", str(tmp_path / "hf"), env={"HF_ENDPOINT": closed.url})
    assert done.returncode == 2 and "the hub cannot be reached from here" in done.stderr, done.stderr


@pytest.mark.parametrize("model, says", [
    (".", "is a local folder: there is nothing to fetch"),
    ("a/b/c", "is neither a local folder nor a Hugging Face model id"),
])
def test_what_cannot_be_fetched_is_refused(model, says, tmp_path):
    done = run("fetch", model, "--hf-home", str(tmp_path / "hf"), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and says in done.stderr, done.stderr


def render(*args, env=None):
    ours, vllms = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, ())
    return run("render", *ours, "--gpus-per-node", "1", "-p", "gpu", *vllms, env=env)


def test_offline_nodes_get_the_cache_and_hf_hub_offline_in_the_script(tmp_path):
    lay_out(tmp_path / "hf", "org/tiny")
    done = render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert f"HF_HOME={tmp_path / 'hf'}" in done.stdout and "HF_HUB_OFFLINE=1" in done.stdout
    inherited = render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"), env={"HF_HUB_CACHE": "/elsewhere"})
    assert inherited.returncode == 0, inherited.stderr  # the job's own HF_HUB_CACHE is what counts
    lay_out(tmp_path / "other", "org/tiny")
    mine = render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"), "--env", "HF_HUB_OFFLINE=0",
                  "--env", f"HF_HOME={tmp_path / 'other'}")
    assert mine.returncode == 0, mine.stderr
    assert "HF_HUB_OFFLINE=0" in mine.stdout and "HF_HUB_OFFLINE=1" not in mine.stdout  # --env wins
    assert f"HF_HUB_CACHE={tmp_path / 'hf' / 'hub'}" in mine.stdout  # an inherited HF_HUB_CACHE would beat HF_HOME
    assert f"HF_HOME={tmp_path / 'other'}" in mine.stdout and f"HF_HOME={tmp_path / 'hf'}" not in mine.stdout


def test_offline_nodes_and_a_hub_model_not_fetched_is_refused_before_anything_is_written(tmp_path):
    done = render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"), "-o", str(tmp_path / "job.sbatch"))
    assert done.returncode == 2 and not (tmp_path / "job.sbatch").exists()
    assert done.stderr == (f"error: org/tiny is not in the Hugging Face cache at {tmp_path / 'hf' / 'hub'}, and the "
                           "nodes are offline (--offline).\nFetch it first, where the hub is reachable: hpc-serve fetch "
                           f"org/tiny --hf-home {tmp_path / 'hf'}\n")
    snapshot = lay_out(tmp_path / "hf", "org/tiny")
    (snapshot / "model.safetensors").unlink()  # what an interrupted fetch leaves: the config, no weights
    half = render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"))
    assert half.returncode == 2 and f"its snapshot {snapshot} has no weights: an interrupted fetch?" in half.stderr
    other = render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"), "--", "--revision", "v2")
    assert other.returncode == 2 and "org/tiny at revision v2 is not in the Hugging Face cache" in other.stderr
    assert f"hpc-serve fetch org/tiny --hf-home {tmp_path / 'hf'} --revision v2" in other.stderr
    (snapshot / "model.safetensors").symlink_to(Path("..", "..", "blobs", "def"))
    assert render("org/tiny", "--offline", "--hf-home", str(tmp_path / "hf"), "--", "--revision", SHA).returncode == 0
    local = tmp_path / "model"
    local.mkdir()
    assert render(str(local), "--offline").returncode == 0  # a folder is the nodes' to find (the preflight)
