# Usage (from the repository root):  bash docs/zh/evidence/emfile.sh step07_poll_hangup.py
# Runs a lesson step with only 16 descriptors (ulimit -n 16) in front of a web
# server on port 18000; idle clients use the descriptors up and leave; then one
# HTTP request.  The step's own output goes to /tmp/STEP.emfile.log.
# PORT and SERVER (environment) change the ports 18500 and 18000; LOG, the log's
# file; PYTHON, the python3.
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
