"""第 7 步：遇到 POLLHUP 也接着读。

改动：一侧的写方向已经由我们关闭时，handle_close() 不关它：随后到来的
挂断在意料之中，recv() 也还读得到数据。
修复缺陷 10：POLLHUP 置位时，asyncore 的 poll 循环先调用一次
handle_read()，接着就调用 handle_close()。套接字两个方向都关闭后，
Linux 就会置上 POLLHUP，比如我们转出客户端的 EOF 之后又收到服务端的
FIN——而回复的后半截还在内核里等着。

用法：python step07_poll_hangup.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
（Python 3.12 及以上先要：pip install pyasyncore）
"""

import optparse
import socket
import sys
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


def serve(timeout=30.0, count=None):
    """运行事件循环（测试每次只让它跑一轮）。"""
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
