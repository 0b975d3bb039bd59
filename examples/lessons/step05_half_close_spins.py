"""Step 5: half-close -- pass each EOF on, after the data before it.

Adds: on EOF from one side, send the other side what is still buffered,
then shutdown(SHUT_WR) it; close both sockets once both ways are done.
Fixes defect 2: asyncore's recv() calls handle_close() on EOF, and the
article closed both sockets there, dropping what was still buffered and
any reply to a client that half-closes (printf 'GET /...' | nc -N).
Shows defect 9: readable() stays true after EOF, so poll() reports that
socket in every round: a busy loop while the other way is still open.
Shows defect 10: poll() calls handle_close() on POLLHUP, which comes with
the server's FIN once we have shut down our side: the reply's tail is lost.

Usage:  python step05_half_close_spins.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
(Python 3.12+ first needs:  pip install pyasyncore)
"""

import optparse
import socket
import sys
import warnings

try:
    with warnings.catch_warnings():
        # 3.10 and 3.11 warn that asyncore is deprecated; 3.12 removed it,
        # and the pyasyncore backport brings it back under the same name.
        warnings.simplefilter('ignore', DeprecationWarning)
        import asyncore
except ImportError:
    sys.exit('This Python has no asyncore module: pip install pyasyncore')

# Stop reading from one side while this much waits to be sent to the other.
BUFFER_LIMIT = 64 * 1024


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
        self.from_remote_buffer=bytearray()
        self.to_remote_buffer=bytearray()
        self.sender=None
        self.eof=False           # the client has sent everything
        self.write_closed=False  # the server's EOF was passed on to the client

    def handle_connect(self):
        pass

    def readable(self):
        return len(self.from_remote_buffer) < BUFFER_LIMIT

    def handle_read(self):
        # self.socket.recv(), not self.recv(): on EOF asyncore's recv()
        # calls handle_close(), which closes both sockets at once.
        read = self.socket.recv(4096)
        # print('%04i -->'%len(read))
        if read:
            self.from_remote_buffer += read
        else:
            self.eof=True

    def writable(self):
        return (len(self.to_remote_buffer) > 0) or (self.sender.eof and not self.write_closed)

    def handle_write(self):
        sent = self.send(self.to_remote_buffer)
        # print('%04i <--'%sent)
        del self.to_remote_buffer[:sent]
        if not self.to_remote_buffer and self.sender.eof:
            self.shutdown_write()

    def handle_close(self):
        self.close()
        if self.sender:
            self.sender.close()

    def shutdown_write(self):
        """Pass the server's EOF on to the client; close once both ways are done."""
        self.socket.shutdown(socket.SHUT_WR)
        self.write_closed=True
        if self.sender.write_closed:
            self.close()
            self.sender.close()

class sender(asyncore.dispatcher):
    def __init__(self, receiver, remoteaddr,remoteport):
        asyncore.dispatcher.__init__(self)
        self.receiver=receiver
        receiver.sender=self
        self.eof=False           # the server has sent everything
        self.write_closed=False  # the client's EOF was passed on to the server
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.connect((remoteaddr, remoteport))

    def handle_connect(self):
        pass

    def readable(self):
        return len(self.receiver.to_remote_buffer) < BUFFER_LIMIT

    def handle_read(self):
        read = self.socket.recv(4096)
        # print('<-- %04i'%len(read))
        if read:
            self.receiver.to_remote_buffer += read
        else:
            self.eof=True

    def writable(self):
        return ((len(self.receiver.from_remote_buffer) > 0)
                or (self.receiver.eof and not self.write_closed))

    def handle_write(self):
        sent = self.send(self.receiver.from_remote_buffer)
        # print('--> %04i'%sent)
        del self.receiver.from_remote_buffer[:sent]
        if not self.receiver.from_remote_buffer and self.receiver.eof:
            self.shutdown_write()

    def handle_close(self):
        self.close()
        self.receiver.close()

    def shutdown_write(self):
        """Pass the client's EOF on to the server; close once both ways are done."""
        self.socket.shutdown(socket.SHUT_WR)
        self.write_closed=True
        if self.receiver.write_closed:
            self.close()
            self.receiver.close()


def serve(timeout=30.0, count=None):
    """Run the event loop (the tests run it one round at a time)."""
    asyncore.loop(timeout, use_poll=True, count=count)


if __name__=='__main__':
    parser = optparse.OptionParser()
    parser.add_option('-l','--local-ip', dest='local_ip',default='127.0.0.1', help='Local IP address to bind to')
    parser.add_option('-p','--local-port', type='int',dest='local_port',default=80, help='Local port to bind to')
    parser.add_option('-r','--remote-ip',dest='remote_ip', help='Local IP address to bind to')
    parser.add_option('-P','--remote-port', type='int',dest='remote_port',default=80, help='Remote port to bind to')
    options, args = parser.parse_args()
    f = forwarder(options.local_ip,options.local_port,options.remote_ip,options.remote_port)
    print('listening on port %d' % f.socket.getsockname()[1], flush=True)  # -p 0: a free port
    serve()
