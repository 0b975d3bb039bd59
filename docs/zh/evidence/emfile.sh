# 用法（在仓库根目录下）：bash docs/zh/evidence/emfile.sh step07_poll_hangup.py
# 只给课程的某一步 16 个描述符（ulimit -n 16），让它转发到端口 18000 上的
# Web 服务器；空闲客户端先把描述符占满再离开，然后发一个 HTTP 请求。
# 这一步自己的输出写到 /tmp/STEP.emfile.log。
# 环境变量 PORT、SERVER 换掉端口 18500 和 18000，LOG 换掉日志文件，PYTHON 换掉 python3。
export PORT=${PORT:-18500} SERVER=${SERVER:-18000}
LOG=${LOG:-/tmp/$1.emfile.log}
(ulimit -n 16; exec "${PYTHON:-python3}" -W ignore "examples/lessons/$1" -l 127.0.0.1 -p "$PORT" -r 127.0.0.1 -P "$SERVER") \
    > "$LOG" 2>&1 &
forwarder=$!
sleep 0.5
"${PYTHON:-python3}" - <<'PY'
import os, socket, time, urllib.request
port = int(os.environ['PORT'])
idle = []
for _ in range(8):
    try:
        idle.append(socket.create_connection(('127.0.0.1', port)))
    except OSError as e:
        print('client %d: %s' % (len(idle) + 1, e)); break
    time.sleep(0.1)
print('%d idle clients connected' % len(idle))
time.sleep(1)
for c in idle: c.close()
time.sleep(1.5)
try:
    print('after the idle clients left:', len(urllib.request.urlopen('http://127.0.0.1:%d/' % port, timeout=3).read()), 'bytes')
except Exception as e:
    print('after the idle clients left:', e)
PY
kill $forwarder 2>/dev/null; wait $forwarder 2>/dev/null || true  # killed: not a failure
