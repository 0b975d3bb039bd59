"""第 8 步：经得起忙碌的 accept。

改动：用 handle_accepted() 代替 handle_accept()；accept() 出错后暂停
一会儿（ACCEPT_PAUSE 秒内 readable() 返回 False）；backlog 由 5 改为 1024。
修复缺陷 5：客户端已经走了（ECONNABORTED、EAGAIN）时，asyncore 的
accept() 返回 None，conn, addr = None 于是抛出 TypeError。
修复缺陷 6：accept() 抛出 EMFILE（描述符用完了）时，异常交给默认的
handle_error()，它关闭监听套接字：从此再也不接受新客户端。

用法：python step08_accept.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
（Python 3.12 及以上先要：pip install pyasyncore）
"""

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
        # asyncore 的 handle_accept() 每接受一个客户端就调用这里一次；
        # 客户端已经走了、accept() 返回 None 时，它会跳过。
        # print('--- Connect --- ')
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
        # poll() 遇到 POLLHUP 也会调用这里：shutdown_write() 之后，
        # 那只是客户端的 FIN。接着读，轮到时 recv() 自会返回 EOF。
        if self.write_closed:
            return
        self.close()
        if self.sender:
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
        # poll() 遇到 POLLHUP 也会调用这里：shutdown_write() 之后，
        # 那只是服务端的 FIN。接着读，轮到时 recv() 自会返回 EOF。
        if self.write_closed:
            return
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
    parser.add_option('-r','--remote-ip',dest='remote_ip', help='Local IP address to bind to')
    parser.add_option('-P','--remote-port', type='int',dest='remote_port',default=80, help='Remote port to bind to')
    options, args = parser.parse_args()
    f = forwarder(options.local_ip,options.local_port,options.remote_ip,options.remote_port)
    print('listening on port %d' % f.socket.getsockname()[1], flush=True)  # -p 0：空闲端口
    serve()
