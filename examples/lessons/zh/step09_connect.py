"""第 9 步：连接服务端，并把发生的事说清楚。

改动：服务端的名字只在启动时解析一次；连接超过 CONNECT_TIMEOUT 秒还没
连上，就关闭客户端；出错时记一行日志，不打印回溯；支持 IPv6 地址；
用 logging 记日志；--help 的说明改对。
修复缺陷 7：connect() 在循环里为每个客户端解析一次名字，其他连接全被
卡住；服务端不应答时，客户端被永远挂着；连接被拒绝时打印 asyncore 的
回溯。修复缺陷 8 中 IPv6、日志和帮助文字的部分：原文只支持 AF_INET，
print 被注释掉，帮助里写着“-r: Local IP ...”。

用法：python step09_connect.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
（Python 3.12 及以上先要：pip install pyasyncore）
"""

import logging
import optparse
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
    asyncore.loop(timeout, use_poll=True, count=count)


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
