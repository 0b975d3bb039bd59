"""第 10 步：事件不再送错对象。

改动：serve() 自己运行 asyncore 的 poll 循环（即它的 poll2()，20 行），
派发前核对：事件要交给的对象，正是当初登记轮询的那一个。
修复缺陷 11（python/cpython#75114）：处理函数关闭了一个套接字，
而同一轮里又有新套接字拿到同一个描述符编号时（每一侧都会关闭另一侧，
监听套接字又接受了新连接），asyncore.loop() 会把旧套接字的事件
交给新对象。比如一次什么也读不到的读（EAGAIN），会把新客户端
无缘无故地断掉。

用法：python step10_stale_events.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
（Python 3.12 及以上先要：pip install pyasyncore）
"""

import logging
import optparse
import select
import socket
import sys
import time
import warnings

try:
    with warnings.catch_warnings():
        # 3.10 和 3.11 会警告 asyncore 已弃用；3.12 删除了它，pyasyncore
        # 这个向后移植包以同样的名字把它带了回来。
        warnings.simplefilter('ignore', DeprecationWarning)
        import asyncore
except ImportError:
    sys.exit('This Python has no asyncore module: pip install pyasyncore')

# 一侧读进来、等着发往另一侧的数据攒到这么多时，就先不读这一侧。
BUFFER_LIMIT = 64 * 1024
# accept() 失败后（例如描述符用完了），暂停接受这么久。
ACCEPT_PAUSE = 1.0
# 发出连接后，服务端这么多秒内不应答就放弃。
CONNECT_TIMEOUT = 10.0

log = logging.getLogger('forwarder')


def family(host):
    """::1 这样的 IPv6 地址用 AF_INET6，其余用 AF_INET。"""
    return socket.AF_INET6 if ':' in host else socket.AF_INET


class forwarder(asyncore.dispatcher):
    def __init__(self, ip, port, remoteip,remoteport,backlog=1024):
        asyncore.dispatcher.__init__(self)
        # 服务端的名字在这里解析一次：放在循环里，一次慢的 DNS 查询会卡住所有
        # 连接。
        self.remoteip=socket.getaddrinfo(remoteip,remoteport,0,socket.SOCK_STREAM)[0][4][0]
        self.remoteport=remoteport
        self.paused_until=0.0
        self.create_socket(family(ip),socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind((ip,port))
        self.listen(backlog)

    def readable(self):
        return time.monotonic() >= self.paused_until

    def handle_accepted(self, conn, addr):
        # asyncore 的 handle_accept() 每接受一个客户端就调用这里一次；
        # 客户端已经走了、accept() 返回 None 时，它会跳过。
        log.info('connection from %s port %d', addr[0], addr[1])
        client=receiver(conn)
        try:
            sender(client,self.remoteip,self.remoteport)
        except OSError:
            client.close()  # 服务端一侧没建成（EMFILE？）：别把客户端一侧留在映射里
            raise           # handle_error() 会暂停接受

    def handle_error(self):
        # accept() 抛出了异常，比如 EMFILE。默认的 handle_error()
        # 会关闭监听套接字；不理它又会空转，因为那个客户端还在 backlog
        # 里等着。那就暂停一会儿，其间让别的连接有机会关闭。
        log.warning('accept: %s; pausing for %g s', sys.exc_info()[1], ACCEPT_PAUSE)
        self.paused_until = time.monotonic() + ACCEPT_PAUSE

class receiver(asyncore.dispatcher):
    def __init__(self,conn):
        asyncore.dispatcher.__init__(self,conn)
        self.from_remote_buffer=bytearray()
        self.to_remote_buffer=bytearray()
        self.sender=None
        self.eof=False           # 客户端已发完
        self.write_closed=False  # 服务端的 EOF 已转给客户端

    def handle_connect(self):
        pass

    def readable(self):
        return not self.eof and len(self.from_remote_buffer) < BUFFER_LIMIT

    def handle_read(self):
        # 用 self.socket.recv()，不用 self.recv()：asyncore 的 recv()
        # 读到 EOF 就调用 handle_close()，而它会把两个套接字一起关掉。
        read = self.socket.recv(4096)
        log.debug('%04i -->', len(read))
        if read:
            self.from_remote_buffer += read
        else:
            self.eof=True

    def writable(self):
        return (len(self.to_remote_buffer) > 0) or (self.sender.eof and not self.write_closed)

    def handle_write(self):
        sent = self.send(self.to_remote_buffer)
        log.debug('%04i <--', sent)
        del self.to_remote_buffer[:sent]
        if not self.to_remote_buffer and self.sender.eof:
            self.shutdown_write()

    def handle_close(self):
        # poll() 遇到 POLLHUP 也会调用这里：shutdown_write() 之后，
        # 那只是客户端的 FIN。接着读，轮到时 recv() 自会返回 EOF。
        if self.write_closed:
            return
        self.close()
        if self.sender:
            self.sender.close()

    def handle_error(self):
        # 记一行日志，代替 asyncore 打印的回溯（回溯只留给程序错误）。
        error = sys.exc_info()[1]
        log.warning('client %s port %d: %s', self.addr[0], self.addr[1], error,
                    exc_info=not isinstance(error, OSError))
        self.close()
        self.sender.close()

    def shutdown_write(self):
        """把服务端的 EOF 转给客户端；两个方向都结束就关闭。"""
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
        self.eof=False           # 服务端已发完
        self.write_closed=False  # 客户端的 EOF 已转给服务端
        self.create_socket(family(remoteaddr), socket.SOCK_STREAM)
        self.deadline=time.monotonic() + CONNECT_TIMEOUT
        self.connect((remoteaddr, remoteport))

    def handle_connect(self):
        pass

    def readable(self):
        return not self.eof and len(self.receiver.to_remote_buffer) < BUFFER_LIMIT

    def handle_read(self):
        read = self.socket.recv(4096)
        log.debug('<-- %04i', len(read))
        if read:
            self.receiver.to_remote_buffer += read
        else:
            self.eof=True

    def writable(self):
        if self.connecting and time.monotonic() > self.deadline:
            log.warning('server %s port %d: connect timed out', self.addr[0], self.addr[1])
            self.close()
            self.receiver.close()
            return False
        # 连接进行中要等可写：poll() 以可写报告连接的结果。
        return (self.connecting or (len(self.receiver.from_remote_buffer) > 0)
                or (self.receiver.eof and not self.write_closed))

    def handle_write(self):
        sent = self.send(self.receiver.from_remote_buffer)
        log.debug('--> %04i', sent)
        del self.receiver.from_remote_buffer[:sent]
        if not self.receiver.from_remote_buffer and self.receiver.eof:
            self.shutdown_write()

    def handle_close(self):
        # poll() 遇到 POLLHUP 也会调用这里：shutdown_write() 之后，
        # 那只是服务端的 FIN。接着读，轮到时 recv() 自会返回 EOF。
        if self.write_closed:
            return
        self.close()
        self.receiver.close()

    def handle_error(self):
        # 记一行日志，代替 asyncore 打印的回溯（回溯只留给程序错误）。
        error = sys.exc_info()[1]
        log.warning('server %s port %d: %s', self.addr[0], self.addr[1], error,
                    exc_info=not isinstance(error, OSError))
        self.close()
        self.receiver.close()

    def shutdown_write(self):
        """把客户端的 EOF 转给服务端；两个方向都结束就关闭。"""
        self.socket.shutdown(socket.SHUT_WR)
        self.write_closed=True
        if self.receiver.write_closed:
            self.close()
            self.receiver.close()


def serve(timeout=1.0, count=None):
    """运行事件循环（测试每次只让它跑一轮）。"""
    # 超时要短：没有事件时，只有 poll() 返回了，readable() 才会被再问一次，
    # 而暂停应当按时结束。
    channels = asyncore.socket_map
    while channels and count != 0:
        pollster = select.poll()
        polled = {}
        for fd, obj in list(channels.items()):
            flags = 0
            if obj.readable():
                flags |= select.POLLIN | select.POLLPRI
            if obj.writable() and not obj.accepting:
                flags |= select.POLLOUT
            if flags:
                pollster.register(fd, flags)
                polled[fd] = obj
        for fd, flags in pollster.poll(timeout * 1000):
            # asyncore.loop() 在这里按描述符重新查一次映射：这个编号可能已经
            # 属于本轮中新建的套接字。
            if channels.get(fd) is polled[fd]:
                asyncore.readwrite(polled[fd], flags)
        if count is not None:
            count -= 1


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
