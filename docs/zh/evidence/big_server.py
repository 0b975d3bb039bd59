"""给每个客户端发 300 MB，客户端收多快就发多快，然后关闭（端口 18100）。"""
import socket
import threading

s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 18100)); s.listen(5)
def serve(c):
    chunk = b'x' * 65536
    try:
        for _ in range(300 * 16): c.sendall(chunk)
    except OSError: pass
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
