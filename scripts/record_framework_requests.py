"""Record the exact requests LangChain, LlamaIndex and Haystack send to an OpenAI-compatible server
when their default question-answering chains ask a question about a passage; written as the fixtures
``tests/fixtures/frameworks/*.json`` that the tests replay against ``loraqa serve`` without the
frameworks installed.

    pip install -e '.[frameworks]'
    python scripts/record_framework_requests.py --output tests/fixtures/frameworks

A recording server on 127.0.0.1 answers every chat request with a fixed answer and keeps its body;
each framework runs its own default chain (``examples/chains.py``) over two tiny passages.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from chains import CHAINS  # noqa: E402 - examples/ is not a package

PASSAGES = [
    ("The mill on the Wey was rebuilt in 1887 by the Muller family, after the flood of 1886 had carried "
     "its wheel away.", "When was the mill rebuilt?"),
    ("Steam engines use a boiler to raise steam, which pushes a piston; the condenser returns the "
     "working fluid to the boiler as a liquid.", "What pushes the piston?"),
]
RECORDED: list[dict] = []


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the standard library's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RECORDED.append({"path": self.path, "body": body})
        reply = {"id": "r", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "1887"}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        data = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


OTHER = "The valley's roads were paved in 1902."  # the document LlamaIndex's refine reads first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tests/fixtures/frameworks")
    args = parser.parse_args()
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/v1"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, (chain, package) in CHAINS.items():
        RECORDED.clear()
        cases = []
        for passage, question in PASSAGES:
            chain(base, "m", [OTHER, passage] if name.endswith("refine") else [passage], question)
            chats = [r for r in RECORDED if r["path"].endswith("/chat/completions")]
            cases.append({"passage": passage, "question": question, "request": chats[-1]["body"]})
            RECORDED.clear()
        (out / f"{name}.json").write_text(json.dumps({"framework": package, "version": version(package),
                                                      "cases": cases}, indent=2) + "\n")
        print(f"{name}: {package} {version(package)}, {len(cases)} requests")
    server.shutdown()


if __name__ == "__main__":
    main()
