"""A real MJPEG-over-HTTP server in the way an ESP32-CAM serves one (`/stream`,
multipart/x-mixed-replace, one JPEG per part, chunked), that a test can stall, take down and up again
(as a reboot does) or make send a damaged part. `/` is the camera's web page; any other path
answers 404. Also a command, to point the agent at by hand:

    python tests/mjpeg_server.py PORT photo.jpg|video.mp4 [FPS]
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
from typing import Sequence

import cv2
import numpy as np

BOUNDARY = "123456789000000000000987654321"  # the ESP32-CAM web server's
PAGE = b"<!doctype html><title>ESP32 OV2640</title><img src=':81/stream'>"


def jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def video_jpegs(path: str, limit: int = 60) -> list[bytes]:
    """The first `limit` frames of a video, as JPEGs."""
    cap = cv2.VideoCapture(path)
    frames = []
    while len(frames) < limit:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(jpeg(image))
    cap.release()
    return frames


def _closed_by_peer(conn: socket.socket) -> bool:
    """Whether the client has closed its end (it sends nothing after its request)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Server(socketserver.ThreadingTCPServer):
    # Its own class: setting these on ThreadingTCPServer would change it for the whole process.
    allow_reuse_address = True  # up() binds the same port again at once
    daemon_threads = True


class MjpegServer:
    """Serves `frames` in a loop at `fps` to every client of /stream, on a port of its own that
    stays the same across `down()` and `up()`.

    `stall()`: every connection stays open and sends nothing more, until `resume()`.
    `down()`: every connection is closed and the port refuses, until `up()`.
    `send_next(data, length)`: the next part each client gets carries `data` instead of a frame,
    and `length` (as given) in its Content-Length header instead of the length of `data`.
    `streaming()`: how many clients are being sent the stream now. A client that closes its end is
    seen as gone at the next part the server sends it (a frame interval later), or at once while
    the stream is stalled.
    """

    def __init__(self, frames: Sequence[bytes], fps: float = 10.0, *, content_length: bool = True, port: int = 0):
        self.frames = list(frames)
        self.fps = fps
        self.content_length = content_length
        self.sent = 0  # parts sent, over every connection
        self.connections = 0
        self._running = threading.Event()  # cleared while stalled
        self._running.set()
        self._injected: list[bytes] = []
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._streams: set[socket.socket] = set()  # the clients of /stream, until their connection ends
        self._server: socketserver.ThreadingTCPServer | None = None
        self.port = port
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream"

    def _listen(self) -> None:
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._serve(self.request)

        server = _Server(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _write(self, conn: socket.socket, data: bytes) -> None:
        if data:  # an empty chunk would end the response
            conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))  # chunked, as the ESP32-CAM's server sends

    def _serve(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            got = conn.recv(4096)
            if not got:
                return
            request += got
        with self._lock:
            self._clients.add(conn)
            self.connections += 1
        try:
            if request.startswith(b"GET / "):  # the camera's web page, as the ESP32-CAM serves on port 80
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(PAGE), PAGE))
                return
            if not request.startswith(b"GET /stream "):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            conn.sendall(("HTTP/1.1 200 OK\r\n"
                          f"Content-Type: multipart/x-mixed-replace;boundary={BOUNDARY}\r\n"
                          + "Transfer-Encoding: chunked\r\n"
                          + "Access-Control-Allow-Origin: *\r\n\r\n").encode())
            with self._lock:
                self._streams.add(conn)
            index = 0
            while True:
                while not self._running.wait(0.05):
                    if _closed_by_peer(conn):
                        return
                with self._lock:
                    body, length = self._injected.pop(0) if self._injected else (self.frames[index % len(self.frames)], None)
                index += 1
                head = "Content-Type: image/jpeg\r\n"
                if self.content_length:
                    head += f"Content-Length: {len(body) if length is None else length}\r\n"
                self._write(conn, f"\r\n--{BOUNDARY}\r\n{head}\r\n".encode())
                self._write(conn, body)
                self.sent += 1
                time.sleep(1.0 / self.fps)
        except OSError:
            pass  # the client went, or down() closed the connection
        finally:
            with self._lock:
                self._clients.discard(conn)
                self._streams.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def streaming(self) -> int:
        with self._lock:
            return len(self._streams)

    def send_next(self, data: bytes, length: str | None = None) -> None:
        with self._lock:
            self._injected.append((data, length))

    def stall(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def _drop_clients(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        """Every connection reset, the port closed (connection refused) until `up()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._drop_clients()
        self._running.set()

    def up(self) -> None:
        self._listen()

    def close(self) -> None:
        self.down()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python tests/mjpeg_server.py PORT photo.jpg|video.mp4 [FPS]")
    still = cv2.imread(sys.argv[2])
    frames = [jpeg(still)] if still is not None else video_jpegs(sys.argv[2], limit=300)
    server = MjpegServer(frames, float(sys.argv[3]) if len(sys.argv) == 4 else 10.0, port=int(sys.argv[1]))
    print(f"serving {len(frames)} frame(s) at {server.url}", flush=True)
    threading.Event().wait()
