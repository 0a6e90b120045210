"""A stand-in for the Hugging Face Hub on 127.0.0.1 that records what huggingface_hub sends when it pushes.

It answers the four endpoints a push of small files goes through in huggingface_hub 2.4.0 (HfApi.create_repo,
upload_folder and upload_file, with hf_xet disabled so upload_folder takes its single-commit path):

- ``POST /api/repos/create``: the repo's url (``{endpoint}/{owner}/{name}``, owner "me" when none is given);
- ``POST /api/validate-yaml``: no errors (the client checks a README.md's metadata before committing it);
- ``POST /api/models/{repo}/preupload/{rev}``: every file ``"regular"``, so its bytes travel base64-encoded in
  the commit itself and no LFS or Xet transfer is needed;
- ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (a header line, then one line per file), decoded.

Any GET gets a 404 (huggingface_hub asks ``/api/agent-harnesses`` for its user agent, without a token; it shrugs
off the 404). A POST whose ``Authorization`` is not ``Bearer <token>`` gets a 401, as the Hub answers a bad token. Nothing
here is the real Hub: what the real one does with large files (LFS/Xet) is not exercised by the tests.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["RecordingHub"]

_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class RecordingHub:
    """``with RecordingHub(token) as hub:`` ... ``hub.endpoint``, ``hub.requests``, ``hub.created``, ``hub.commits``."""

    def __init__(self, token: str):
        self.token = token
        self.requests: list[dict] = []  # method, path, authorization
        self.created: list[dict] = []  # create payloads
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._record(self, b"")
                self._answer(404, {"error": "Repository not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub._record(self, body)
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._answer(401, {"error": "Invalid credentials in Authorization header"})
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    owner = payload.get("organization") or "me"
                    self._answer(200, {"url": f"{hub.endpoint}/{owner}/{payload['name']}", "name": payload["name"]})
                elif path == "/api/validate-yaml":
                    self._answer(200, {"errors": [], "warnings": []})
                elif m := re.fullmatch(_REPO + r"/preupload/[^/]+", path):
                    files = json.loads(body)["files"]
                    answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    self._answer(200, {"files": answer, "commitOid": "0" * 40})
                elif m := re.fullmatch(_REPO + r"/commit/[^/]+", path):
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    others = [line["key"] for line in lines if line["key"] not in ("header", "file")]
                    hub.commits.append(
                        {"repo": m["repo"], "summary": header["summary"], "files": files, "other": others}
                    )
                    oid = f"{len(hub.commits):040x}"
                    self._answer(200, {"commitUrl": f"{hub.endpoint}/{m['repo']}/commit/{oid}", "commitOid": oid})
                else:
                    self._answer(404, {"error": f"no route {path}"})

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        self.requests.append(
            {"method": handler.command, "path": handler.path, "authorization": handler.headers.get("Authorization")}
        )

    @property
    def files(self) -> dict[str, bytes]:
        """Every file committed, the last version of each."""
        return {path: data for commit in self.commits for path, data in commit["files"].items()}

    def __enter__(self) -> RecordingHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
