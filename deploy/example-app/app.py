"""Example upstream for Gimlet (standard library only; not for production).

It answers every request with JSON describing the session headers it received,
and changes the session with X-Session-* response directives:
  /login?user=NAME   X-Session-Set: user=NAME  +  X-Session-Regenerate: 1
  /count             X-Session-Incr: visits=1
  /cart?add=ITEM     X-Session-Set: cart=...   (a clientside key)
  /logout            X-Session-Destroy: 1
Request headers are echoed in the body only: an X-Session-* response header
the gateway does not know is a directive error (502).
"""
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

ECHO = ("x-session", "x-remote-", "x-forwarded-")


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive to the gateway

    def do_GET(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a chunked body is not read: no reuse
        else:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))  # drain a POST body
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        session = dict(parse_qsl(self.headers.get("X-Session", ""), keep_blank_values=True))
        out = []
        if url.path == "/login" and query.get("user"):
            out += [("X-Session-Set", urlencode({"user": query["user"]})), ("X-Session-Regenerate", "1")]
        elif url.path == "/count":
            out.append(("X-Session-Incr", urlencode({"visits": 1})))
        elif url.path == "/cart" and query.get("add"):
            cart = ",".join(filter(None, [session.get("cart", ""), query["add"]]))
            out.append(("X-Session-Set", urlencode({"cart": cart})))
        elif url.path == "/logout":
            out.append(("X-Session-Destroy", "1"))
        received = {k: v for k, v in self.headers.items() if k.lower().startswith(ECHO)}
        body = json.dumps({"path": url.path, "received": received, "session": session,
                           "directives": dict(out)}, indent=2).encode() + b"\n"
        self.send_response(200)
        for name, value in out:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_POST = do_GET


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 in a container
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer((os.environ.get("HOST", "0.0.0.0"), port), App)
    print(f"example app on http://{server.server_address[0]}:{port}", flush=True)
    server.serve_forever()
