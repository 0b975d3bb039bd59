# 读请求直到客户端的 EOF，想 3 秒，回复一行，关闭。端口 18200。
import socket
import threading
import time

s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 18200)); s.listen(5)
def serve(c):
    while c.recv(4096): pass
    time.sleep(3); c.sendall(b'reply after 3 s\n'); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
