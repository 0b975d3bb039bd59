# 用法（在仓库根目录下）：bash docs/zh/evidence/emfile.sh step07_poll_hangup.py
# 只给课程的某一步 16 个描述符（ulimit -n 16），让它转发到端口 18000 上的
# Web 服务器；空闲客户端先把描述符占满再离开，然后发一个 HTTP 请求。
# 这一步自己的输出写到 /tmp/STEP.emfile.log。
(ulimit -n 16; exec python3 -W ignore "examples/lessons/$1" -l 127.0.0.1 -p 18500 -r 127.0.0.1 -P 18000) \
    > "/tmp/$1.emfile.log" 2>&1 &
forwarder=$!
sleep 0.5
python3 - <<'PY'
import socket, time, urllib.request
idle = []
for _ in range(8):
    try:
        idle.append(socket.create_connection(('127.0.0.1', 18500)))
    except OSError as e:
        print('client %d: %s' % (len(idle) + 1, e)); break
    time.sleep(0.1)
print('%d idle clients connected' % len(idle))
time.sleep(1)
for c in idle: c.close()
time.sleep(1.5)
try:
    print('after the idle clients left:', len(urllib.request.urlopen('http://127.0.0.1:18500/', timeout=3).read()), 'bytes')
except Exception as e:
    print('after the idle clients left:', e)
PY
kill $forwarder 2>/dev/null; wait $forwarder 2>/dev/null
