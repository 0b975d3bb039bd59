# The "Asynchronous port forwarding" recipe (ActiveState recipe 483732), as
# presented in the Chinese article "Python的Asyncore異步Socket模塊及實現端口轉發
# 的例子". The article printed the code without indentation; it is restored
# here. The main block is the one from the original recipe.
#
# This file is kept as a reference and as a test subject: the test suite runs
# it to show its defects. Do not use it to forward real traffic.
#
# What was changed, and why (only what Python 3 forces, plus one line for the
# tests):
#   a. The four buffers start as b'' instead of ''. On Python 3 recv() returns
#      bytes, and '' += bytes raises TypeError on the first read.
#   b. The commented-out log lines use print() instead of the Python 2 print
#      statement, so they still work if uncommented.
#   c. "import socket,asyncore" is split. asyncore is imported inside
#      warnings.catch_warnings() with DeprecationWarning ignored, because the
#      stdlib module warns on import on 3.10/3.11 (this keeps "python -W error"
#      working). 3.12 removed asyncore; there the pyasyncore backport
#      (pip install pyasyncore) provides the same module as "import asyncore".
#   d. The main block keeps the forwarder in a variable "f" and prints its
#      bound port, so that a test can start it with "-p 0". Marked below.
#
# What is still wrong with it. Numbers match the project's list of the
# recipe's defects; for where each one is fixed in asyncore_fwd, see README,
# 'What the article gets wrong'.
#   1. str vs bytes: the original fails on Python 3 at the first recv().
#      Fixed in this file (change a).
#   2. Data loss on close, no half-close: on EOF from one side, handle_close()
#      closes both sockets at once, dropping bytes still buffered for the
#      other side; a client that half-closes and waits for a reply gets none.
#   3. No backpressure: readable() is never False, so a fast sender fills an
#      unbounded buffer; buf = buf[sent:] also copies it per send (O(n^2)).
#   4. asyncore.loop() uses select(): any fd >= 1024 (about 500 concurrent
#      clients) raises ValueError out of loop() and stops the forwarder.
#   5. accept() returns None on EAGAIN/ECONNABORTED; "conn, addr =
#      self.accept()" then raises TypeError.
#   6. EMFILE from accept() goes to handle_error(), whose default
#      handle_close() closes the listening socket: the forwarder stops
#      accepting, silently.
#   7. connect() resolves a hostname synchronously (blocks the whole loop),
#      has no timeout, and each refused connect prints a traceback.
#   8. IPv4 only (AF_INET on both sides), one rule, no access control or
#      logging; the -r help text says "Local IP address to bind to"; the
#      default local port 80 needs root.
#   11. asyncore fd-reuse race (python/cpython#75114): each side closes its
#      peer, so within one select() batch a reused fd can be dispatched to
#      the wrong dispatcher.
#   (Items 9 and 10 of that list are traps for code that adds half-close or
#   use_poll=True; they do not apply to this code as it stands.)

import socket
import warnings

with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    import asyncore


class forwarder(asyncore.dispatcher):
    def __init__(self, ip, port, remoteip,remoteport,backlog=5):
        asyncore.dispatcher.__init__(self)
        self.remoteip=remoteip
        self.remoteport=remoteport
        self.create_socket(socket.AF_INET,socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind((ip,port))
        self.listen(backlog)

    def handle_accept(self):
        conn, addr = self.accept()
        # print('--- Connect --- ')
        sender(receiver(conn),self.remoteip,self.remoteport)

class receiver(asyncore.dispatcher):
    def __init__(self,conn):
        asyncore.dispatcher.__init__(self,conn)
        self.from_remote_buffer=b''
        self.to_remote_buffer=b''
        self.sender=None

    def handle_connect(self):
        pass

    def handle_read(self):
        read = self.recv(4096)
        # print('%04i -->'%len(read))
        self.from_remote_buffer += read

    def writable(self):
        return (len(self.to_remote_buffer) > 0)

    def handle_write(self):
        sent = self.send(self.to_remote_buffer)
        # print('%04i <--'%sent)
        self.to_remote_buffer = self.to_remote_buffer[sent:]

    def handle_close(self):
        self.close()
        if self.sender:
            self.sender.close()

class sender(asyncore.dispatcher):
    def __init__(self, receiver, remoteaddr,remoteport):
        asyncore.dispatcher.__init__(self)
        self.receiver=receiver
        receiver.sender=self
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.connect((remoteaddr, remoteport))

    def handle_connect(self):
        pass

    def handle_read(self):
        read = self.recv(4096)
        # print('<-- %04i'%len(read))
        self.receiver.to_remote_buffer += read

    def writable(self):
        return (len(self.receiver.from_remote_buffer) > 0)

    def handle_write(self):
        sent = self.send(self.receiver.from_remote_buffer)
        # print('--> %04i'%sent)
        self.receiver.from_remote_buffer = self.receiver.from_remote_buffer[sent:]

    def handle_close(self):
        self.close()
        self.receiver.close()

if __name__=='__main__':
    import optparse
    parser = optparse.OptionParser()
    parser.add_option('-l','--local-ip', dest='local_ip',default='127.0.0.1', help='Local IP address to bind to')
    parser.add_option('-p','--local-port', type='int',dest='local_port',default=80, help='Local port to bind to')
    parser.add_option('-r','--remote-ip',dest='remote_ip', help='Local IP address to bind to')
    parser.add_option('-P','--remote-port', type='int',dest='remote_port',default=80, help='Remote port to bind to')
    options, args = parser.parse_args()
    f = forwarder(options.local_ip,options.local_port,options.remote_ip,options.remote_port)
    # added for the tests: report the bound port (-p 0)
    print(f.socket.getsockname()[1], flush=True)
    asyncore.loop()
