"""第 11 步：同一个转发器，换到 asyncio 上。

没有新增，也没有新修复：这是用 asyncio 重写的第 10 步，原文的三个类
都还在。receiver（客户端一侧）和 sender（服务端一侧）是
asyncio.Protocol 的子类：asyncore 先问 readable()、writable()，再调用
handle_*()；asyncio 则调用它们的 connection_made()、data_received()、
eof_received()、pause_writing()、resume_writing() 和 connection_lost()。
forwarder 仍然担当监听的角色：有客户端在等时，asyncio 的循环调用它的
handle_accept()。（asyncio 自带的服务器 loop.create_server() 也能替
我们接受连接，但描述符用完时，它每个事件都会再调用 accept()
最多 backlog 次，每次失败都记一段回溯，然后才暂停：
python/cpython#151615。）
第 02-10 步的每一项修复，用 asyncio 的话来说：

  02 每次发送都复制    transport.write()：send() 没发完的由传输保存
                       （3.12 起只重新切片一次读到的字节，而不是全部待发数据）
  03 背压              pause_writing() -> 另一侧的 pause_reading()
  04 select() > 1023   asyncio 用现有最好的选择器（Linux 上是 epoll）
  05-07 半关闭         eof_received() 返回 True；余下数据发完再 write_eof()
  08 accept            同第 10 步：跳过已经走了的客户端；出错（EMFILE）后
                       用 remove_reader() 让监听暂停
  09 connect           create_connection() 在线程里解析名字；
                       wait_for() 过了 CONNECT_TIMEOUT 秒就放弃
  10 过期事件          事件交给 asyncio 登记的句柄，而不是一个编号；
                       关闭传输就会取消这个句柄
  连接重置             connection_lost(error) -> reset()：SO_LINGER 0，abort()

不用 asyncore：在 Python 3.10 到 3.13 上原样运行，不需要 pyasyncore。

用法：python step11_asyncio.py -l 127.0.0.1 -p 8080 -r 127.0.0.1 -P 8000
"""

import asyncio
import logging
import optparse
import os
import socket
import struct

# 一侧读进来、等着发往另一侧的数据攒到这么多时，就先不读这一侧。
BUFFER_LIMIT = 64 * 1024
# accept() 失败后（例如描述符用完了），暂停接受这么久。
ACCEPT_PAUSE = 1.0
# 发出连接后，服务端这么多秒内不应答就放弃。
CONNECT_TIMEOUT = 10.0

log = logging.getLogger('forwarder')

# 这里一切都跑在这个事件循环上（asyncore 里相当于它的 socket_map）：
# 创建 forwarder 时由 get_loop() 创建，由 serve() 运行。
loop = None


def get_loop():
    """本脚本的事件循环，第一次用到时创建。"""
    global loop
    if loop is None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(log_loop_error)
    return loop


def log_loop_error(loop, context):
    """循环自己捕获的错误记成一行，不打印回溯。"""
    error = context.get('exception')
    if error is None:
        log.warning('%s', context['message'])
    else:  # 只有不是 OSError 的（即程序错误）才打印回溯
        log.warning('%s: %s', context['message'], error,
                    exc_info=None if isinstance(error, OSError) else error)


def family(host):
    """::1 这样的 IPv6 地址用 AF_INET6，其余用 AF_INET。"""
    return socket.AF_INET6 if ':' in host else socket.AF_INET


def describe(error):
    """报“Connection refused”，不报 asyncio 的“Connect call failed (...)”"""
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return str(error)


def reset(transport):
    """以重置（RST）关闭：abort() 丢弃缓冲区，但发出的是 FIN。"""
    sock = transport.get_extra_info('socket')
    linger_zero = struct.pack('ii', 1, 0)  # 开启，0 秒：关闭时发 RST
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    except OSError:
        pass  # 它的套接字已经关了
    transport.abort()


class forwarder:
    """监听的角色：接受每个客户端，给它配一个 receiver。"""

    def __init__(self, ip, port, remoteip, remoteport, backlog=1024):
        # 这里不解析名字：create_connection() 为每个客户端在线程里解析，
        # 循环照常运转。
        self.remoteip=remoteip
        self.remoteport=remoteport
        self.loop=get_loop()
        self.socket=socket.create_server((ip, port), family=family(ip), backlog=backlog)
        self.socket.setblocking(False)
        self.loop.add_reader(self.socket, self.handle_accept)

    def accept(self):
        """一个等待中的客户端的 (socket, address)；它已经走了就返回 None。"""
        try:
            return self.socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None

    def handle_accept(self):
        try:
            pair=self.accept()
        except OSError as error:
            # 比如 EMFILE。那个客户端还在 backlog 里等着：照常等下去只会空转。
            # 改为暂时不再关注这个套接字。
            log.warning('accept: %s; pausing for %g s', error, ACCEPT_PAUSE)
            self.loop.remove_reader(self.socket)
            self.loop.call_later(ACCEPT_PAUSE, self.loop.add_reader,
                                 self.socket, self.handle_accept)
            return
        if pair is None:
            return
        conn, addr = pair
        log.info('connection from %s port %d', addr[0], addr[1])
        # connect_accepted_socket() 会在之后的某一轮里创建传输，
        # 并调用 receiver 的 connection_made()。
        self.loop.create_task(self.loop.connect_accepted_socket(
            lambda: receiver(self.remoteip, self.remoteport), conn))


class receiver(asyncio.Protocol):
    """客户端一侧：客户端发来的交给 sender，反方向亦然。"""

    def __init__(self, remoteip, remoteport):
        self.remoteip=remoteip
        self.remoteport=remoteport
        self.transport=None
        self.sender=None
        self.connecting=None
        self.eof=False  # 客户端已发完

    def connection_made(self, transport):
        self.transport=transport
        self.addr=transport.get_extra_info('peername')
        transport.set_write_buffer_limits(high=BUFFER_LIMIT)
        # 服务端一侧连上之前什么都不读：这期间客户端的数据留在内核里，
        # 而不是这里。暂停安排在下一轮、任何读取之前：在 3.10 上，
        # 传输在 connection_made() 之后才开始读，会抵消在 connection_made()
        # 里做的暂停。
        loop=asyncio.get_running_loop()
        loop.call_soon(transport.pause_reading)
        self.connecting=loop.create_task(self.connect())

    async def connect(self):
        """连接服务端一侧；连不上就关闭客户端一侧。"""
        loop=asyncio.get_running_loop()
        host, port = self.remoteip, self.remoteport
        try:
            connect=loop.create_connection(lambda: sender(self), host, port)
            await asyncio.wait_for(connect, CONNECT_TIMEOUT)
        except asyncio.TimeoutError:  # 须在 OSError 之前：3.11 起它属于 OSError
            log.warning('server %s port %d: connect timed out', host, port)
            self.transport.abort()
        except OSError as error:  # 被拒绝、不可达、名字不存在……
            log.warning('server %s port %d: %s', host, port, describe(error))
            self.transport.abort()

    def data_received(self, data):
        # 服务端暂时收不下的，由 sender 的传输保存。
        self.sender.transport.write(data)

    def eof_received(self):
        # 客户端发来的数据都发出去后，再把它的 EOF 转给服务端（write_eof()
        # 会等缓冲区发完）；两个方向都结束就关闭。
        self.eof=True
        self.sender.transport.write_eof()
        if self.sender.eof:
            self.transport.close()
            self.sender.transport.close()
        return True  # 传输保持打开：回复可能还在路上

    def pause_writing(self):
        # 等着发给客户端的超过 BUFFER_LIMIT：暂停读服务端。
        self.sender.transport.pause_reading()

    def resume_writing(self):
        if not self.sender.eof:  # 读到 EOF 之后，已经没有可读的了
            self.sender.transport.resume_reading()

    def connection_lost(self, error):
        # close() 会先把缓冲的数据发完；重置则原样传成重置（发 FIN
        # 会让服务端以为数据流正常结束了）。
        if error is not None:
            host, port = self.addr[:2]
            log.info('client %s port %d: %s', host, port, describe(error))
        if self.sender is None:
            self.connecting.cancel()  # 连接进行中，客户端已经走了
        elif error is None:
            self.sender.transport.close()
        else:
            reset(self.sender.transport)


class sender(asyncio.Protocol):
    """服务端一侧：服务端发来的交给 receiver，反方向亦然。"""

    def __init__(self, receiver):
        self.receiver=receiver
        self.transport=None
        self.eof=False  # 服务端已发完

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
        # 等着发给服务端的超过 BUFFER_LIMIT：暂停读客户端。
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
    """运行事件循环：一直运行，或跑 count 段、每段 timeout 秒（测试一次跑一段）。"""
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
