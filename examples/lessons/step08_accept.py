"""Step 8: an accept loop that survives a busy day.

Adds: handle_accepted() instead of handle_accept(); after an accept() error,
a pause (readable() false for ACCEPT_PAUSE s); a backlog of 1024, not 5.
Fixes defect 5: asyncore's accept() returns None when the client has gone
(ECONNABORTED, EAGAIN), and  conn, addr = None  raised TypeError.
Fixes defect 6: accept() raising EMFILE (out of descriptors) went to the
default handle_error(), which closed the listener: no more clients, ever.

Usage:  python step08_accept.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
(Python 3.12+ first needs:  pip install pyasyncore)
"""

import optparse
import socket
import sys
import time
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
# After accept() fails (e.g. out of descriptors), stop accepting this long.
ACCEPT_PAUSE = 1.0


class forwarder(asyncore.dispatcher):
    def __init__(self, ip, port, remoteip,remoteport,backlog=1024):
        asyncore.dispatcher.__init__(self)
        self.remoteip=remoteip
        self.remoteport=remoteport
        self.paused_until=0.0
        self.create_socket(socket.AF_INET,socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind((ip,port))
        self.listen(backlog)

    def readable(self):
        return time.monotonic() >= self.paused_until

    def handle_accepted(self, conn, addr):
        # asyncore's handle_accept() calls this for each client it accepted,
        # and skips the None that accept() returns when the client has gone.
        # print('--- Connect --- ')
        client=receiver(conn)
        try:
            sender(client,self.remoteip,self.remoteport)
        except OSError:
            client.close()  # no server side (EMFILE?): do not leave the client's in the map
            raise           # handle_error() pauses accepting

    def handle_error(self):
        # accept() raised, e.g. EMFILE.  The default handle_error() closes
        # the listener; ignoring the error would spin, as the client still
        # waits in the backlog.  Pause, and let connections close meanwhile.
        self.paused_until = time.monotonic() + ACCEPT_PAUSE

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
        return not self.eof and len(self.from_remote_buffer) < BUFFER_LIMIT

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
        # poll() calls this on POLLHUP too: after shutdown_write(), that is
        # just the client's FIN.  Read on; recv() returns EOF in its turn.
        if self.write_closed:
            return
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
        return not self.eof and len(self.receiver.to_remote_buffer) < BUFFER_LIMIT

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
        # poll() calls this on POLLHUP too: after shutdown_write(), that is
        # just the server's FIN.  Read on; recv() returns EOF in its turn.
        if self.write_closed:
            return
        self.close()
        self.receiver.close()

    def shutdown_write(self):
        """Pass the client's EOF on to the server; close once both ways are done."""
        self.socket.shutdown(socket.SHUT_WR)
        self.write_closed=True
        if self.receiver.write_closed:
            self.close()
            self.receiver.close()


def serve(timeout=1.0, count=None):
    """Run the event loop (the tests run it one round at a time)."""
    # A short timeout: while nothing happens, readable() is checked again
    # only when poll() returns, and a pause should end on time.
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
