"""Step 11: the same forwarder on asyncio.

Adds nothing and fixes nothing new: it is step 10 rewritten on asyncio, the
article's three classes kept.  receiver (the client's side) and sender (the
server's side) are asyncio.Protocol classes: asyncio calls their
connection_made(), data_received(), eof_received(), pause_writing(),
resume_writing() and connection_lost() where asyncore called handle_*()
after asking readable() and writable().  forwarder keeps the listener's
role: asyncio's loop calls its handle_accept() when a client waits.  (Its
own server, loop.create_server(), would accept for us, but out of
descriptors it calls accept() again up to `backlog` times for each event,
logging each failure with a traceback, before it pauses: python/cpython#151615.)
Each fix of steps 02-10, as asyncio spells it:

  02 copy per send     transport.write(): the transport keeps what send() left
                       (3.12+ re-slices the bytes of one read, not all that waits)
  03 backpressure      pause_writing() -> the other side's pause_reading()
  04 select() > 1023   asyncio uses the best selector there is (epoll on Linux)
  05-07 half-close     eof_received() returns True; write_eof() after the rest
  08 accept            as in step 10: a client gone is skipped; after an error
                       (EMFILE) the listener pauses, with remove_reader()
  09 connect           create_connection() looks the name up in a thread;
                       wait_for() gives up after CONNECT_TIMEOUT s
  10 stale events      an event goes to the handle asyncio registered, which
                       closing the transport cancels, not to a number
  resets               connection_lost(error) -> reset(): SO_LINGER 0, abort()

No asyncore: it runs as it is on Python 3.10 to 3.13, no pyasyncore needed.

Usage:  python step11_asyncio.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
"""

import asyncio
import logging
import optparse
import os
import socket
import struct

# Stop reading from one side while this much waits to be sent to the other.
BUFFER_LIMIT = 64 * 1024
# After accept() fails (e.g. out of descriptors), stop accepting this long.
ACCEPT_PAUSE = 1.0
# Give up on a server that does not answer a connect within this many seconds.
CONNECT_TIMEOUT = 10.0

log = logging.getLogger('forwarder')

# The event loop everything here runs on (asyncore's was its socket_map):
# made by get_loop() when the forwarder is, run by serve().
loop = None


def get_loop():
    """The script's event loop, made on first use."""
    global loop
    if loop is None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(log_loop_error)
    return loop


def log_loop_error(loop, context):
    """One line for an error the loop caught itself, not a traceback."""
    error = context.get('exception')
    if error is None:
        log.warning('%s', context['message'])
    else:  # a traceback only for what is not an OSError: a bug
        log.warning('%s: %s', context['message'], error,
                    exc_info=None if isinstance(error, OSError) else error)


def family(host):
    """AF_INET6 for an IPv6 address such as ::1, else AF_INET."""
    return socket.AF_INET6 if ':' in host else socket.AF_INET


def describe(error):
    """'Connection refused' rather than asyncio's 'Connect call failed (...)'."""
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return str(error)


def reset(transport):
    """Close with a reset (RST): abort() drops the buffer, but sends a FIN."""
    sock = transport.get_extra_info('socket')
    linger_zero = struct.pack('ii', 1, 0)  # on, for 0 s: closing sends RST
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    except OSError:
        pass  # its socket is closed already
    transport.abort()


class forwarder:
    """The listener's role: accept each client, and give it a receiver."""

    def __init__(self, ip, port, remoteip, remoteport, backlog=1024):
        # The name is not looked up here: create_connection() does it for
        # each client, in a thread, while the loop goes on.
        self.remoteip=remoteip
        self.remoteport=remoteport
        self.loop=get_loop()
        self.socket=socket.create_server((ip, port), family=family(ip), backlog=backlog)
        self.socket.setblocking(False)
        self.loop.add_reader(self.socket, self.handle_accept)

    def accept(self):
        """A waiting client's (socket, address), or None if it has gone."""
        try:
            return self.socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None

    def handle_accept(self):
        try:
            pair=self.accept()
        except OSError as error:
            # E.g. EMFILE.  The client still waits in the backlog: to go on
            # would spin.  Stop watching the socket for a while instead.
            log.warning('accept: %s; pausing for %g s', error, ACCEPT_PAUSE)
            self.loop.remove_reader(self.socket)
            self.loop.call_later(ACCEPT_PAUSE, self.loop.add_reader,
                                 self.socket, self.handle_accept)
            return
        if pair is None:
            return
        conn, addr = pair
        log.info('connection from %s port %d', addr[0], addr[1])
        # connect_accepted_socket() makes the transport, and calls the
        # receiver's connection_made(), in a round to come.
        self.loop.create_task(self.loop.connect_accepted_socket(
            lambda: receiver(self.remoteip, self.remoteport), conn))


class receiver(asyncio.Protocol):
    """The client's side: what the client sends goes to the sender, and back."""

    def __init__(self, remoteip, remoteport):
        self.remoteip=remoteip
        self.remoteport=remoteport
        self.transport=None
        self.sender=None
        self.connecting=None
        self.eof=False  # the client has sent everything

    def connection_made(self, transport):
        self.transport=transport
        self.addr=transport.get_extra_info('peername')
        transport.set_write_buffer_limits(high=BUFFER_LIMIT)
        # Read nothing until the server's side is connected: meanwhile the
        # client's bytes wait in the kernel, not here.  Paused in the next
        # round, before any read: on 3.10, the transport starts reading only
        # after connection_made(), and would undo a pause made in it.
        loop=asyncio.get_running_loop()
        loop.call_soon(transport.pause_reading)
        self.connecting=loop.create_task(self.connect())

    async def connect(self):
        """Connect the server's side; close the client's if that fails."""
        loop=asyncio.get_running_loop()
        host, port = self.remoteip, self.remoteport
        try:
            connect=loop.create_connection(lambda: sender(self), host, port)
            await asyncio.wait_for(connect, CONNECT_TIMEOUT)
        except asyncio.TimeoutError:  # before OSError: since 3.11 it is one
            log.warning('server %s port %d: connect timed out', host, port)
            self.transport.abort()
        except OSError as error:  # refused, unreachable, no such name...
            log.warning('server %s port %d: %s', host, port, describe(error))
            self.transport.abort()

    def data_received(self, data):
        # The sender's transport keeps what the server cannot take yet.
        self.sender.transport.write(data)

    def eof_received(self):
        # Pass the client's EOF on once what it sent is out (write_eof()
        # waits for the buffer); close once both ways are done.
        self.eof=True
        self.sender.transport.write_eof()
        if self.sender.eof:
            self.transport.close()
            self.sender.transport.close()
        return True  # keep the transport open: the reply may still come

    def pause_writing(self):
        # More than BUFFER_LIMIT waits for the client: stop reading the server.
        self.sender.transport.pause_reading()

    def resume_writing(self):
        if not self.sender.eof:  # after its EOF, there is nothing more to read
            self.sender.transport.resume_reading()

    def connection_lost(self, error):
        # close() sends what is buffered first; a reset is passed on as one
        # (a FIN would tell the server the stream ended well).
        if error is not None:
            host, port = self.addr[:2]
            log.info('client %s port %d: %s', host, port, describe(error))
        if self.sender is None:
            self.connecting.cancel()  # gone while we were connecting
        elif error is None:
            self.sender.transport.close()
        else:
            reset(self.sender.transport)


class sender(asyncio.Protocol):
    """The server's side: what the server sends goes to the receiver, and back."""

    def __init__(self, receiver):
        self.receiver=receiver
        self.transport=None
        self.eof=False  # the server has sent everything

    def connection_made(self, transport):
        self.transport=transport
        self.receiver.sender=self
        transport.set_write_buffer_limits(high=BUFFER_LIMIT)
        self.receiver.transport.resume_reading()

    def data_received(self, data):
        self.receiver.transport.write(data)

    def eof_received(self):
        self.eof=True
        self.receiver.transport.write_eof()
        if self.receiver.eof:
            self.transport.close()
            self.receiver.transport.close()
        return True

    def pause_writing(self):
        # More than BUFFER_LIMIT waits for the server: stop reading the client.
        self.receiver.transport.pause_reading()

    def resume_writing(self):
        if not self.receiver.eof:
            self.receiver.transport.resume_reading()

    def connection_lost(self, error):
        if error is not None:
            log.info('server %s port %d: %s',
                     self.receiver.remoteip, self.receiver.remoteport, describe(error))
            reset(self.receiver.transport)
        else:
            self.receiver.transport.close()


def serve(timeout=1.0, count=None):
    """Run the event loop: forever, or count slices of timeout s (the tests run one at a time)."""
    loop = get_loop()
    if count is None:
        loop.run_forever()
        return
    for _ in range(count):
        loop.run_until_complete(asyncio.sleep(timeout))


if __name__=='__main__':
    parser = optparse.OptionParser()
    parser.add_option('-l','--local-ip', dest='local_ip',default='127.0.0.1', help='Local IP address to bind to')
    parser.add_option('-p','--local-port', type='int',dest='local_port',default=80, help='Local port to bind to')
    parser.add_option('-r','--remote-ip',dest='remote_ip',
                      help='Remote host name or IP address to connect to')
    parser.add_option('-P','--remote-port', type='int',dest='remote_port',default=80,
                      help='Remote port to connect to')
    options, args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    f = forwarder(options.local_ip,options.local_port,options.remote_ip,options.remote_port)
    log.info('forwarding %s port %d to %s port %d',
             options.local_ip, f.socket.getsockname()[1], f.remoteip, f.remoteport)
    serve()
