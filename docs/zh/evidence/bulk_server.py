# 读请求直到客户端的 EOF，一次发出 1 MB，关闭。端口 18300。
import socket
import threading

s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 18300)); s.listen(5)
def serve(c):
    while c.recv(4096): pass
    c.sendall(b'x' * 1000000); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
