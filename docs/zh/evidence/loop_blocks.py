"""asyncore.loop() runs in the calling thread and returns once the map is empty."""
import asyncore
import socket
import threading
import time


class Listener(asyncore.dispatcher):
    def __init__(self):
        asyncore.dispatcher.__init__(self)
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.bind(('127.0.0.1', 0))
        self.listen(5)
    def handle_accept(self):
        conn, addr = self.accept()
        print('handle_accept() runs in thread: %s' % threading.current_thread().name)
        conn.close()
        self.close()          # the map is now empty: loop() returns
listener = Listener()
port = listener.socket.getsockname()[1]
# a client that connects after 2 s, from another thread
threading.Timer(2.0, lambda: socket.create_connection(('127.0.0.1', port))).start()
start = time.time()
print('calling asyncore.loop() in thread: %s' % threading.current_thread().name)
asyncore.loop()
print('asyncore.loop() returned after %.1f s; map = %r' % (time.time() - start, asyncore.socket_map))
