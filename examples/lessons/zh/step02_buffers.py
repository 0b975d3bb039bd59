"""第 2 步：缓冲区原地消耗。

改动：缓冲区改用 bytearray；每次发送后用 del buf[:sent] 删掉已发出的部分。
修复缺陷 3 的前一半：buf = buf[sent:] 每发送一次，就把还没发的数据整个
复制一遍；慢的一侧消化一个大缓冲区时，总工作量是 O(n**2)。从 bytearray
的开头删除，不会复制剩下的部分。

用法：python step02_buffers.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
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
        del self.to_remote_buffer[:sent]

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
        del self.receiver.from_remote_buffer[:sent]

    def handle_close(self):
        self.close()
        self.receiver.close()


def serve(timeout=30.0, count=None):
    """运行事件循环（测试每次只让它跑一轮）。"""
    asyncore.loop(timeout, count=count)


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
