"""A lesson step's forwarder past descriptor 1023.

Usage:  python2.7 select_limit.py examples/lessons                  (the article, step00)
        python3 select_limit.py examples/lessons step03_backpressure  (any step from 01 on)
"""
import asyncore
import os
import resource
import socket
import sys
import threading

sys.path.insert(0, sys.argv[1])
import importlib

article = importlib.import_module(sys.argv[2] if len(sys.argv) > 2 else 'step00_article')

resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
f = article.forwarder('127.0.0.1', 0, '127.0.0.1', 18000)
port = f.socket.getsockname()[1]
# Occupy about 1100 descriptors, as 550 forwarded connections would.
spare = [os.open('/dev/null', os.O_RDONLY) for _ in range(1100)]
print('highest descriptor in use: %d' % spare[-1])
threading.Timer(0.5, lambda: socket.create_connection(('127.0.0.1', port))).start()
try:
    if hasattr(article, 'serve'):
        article.serve(timeout=1.0, count=20)   # the step's own loop, 20 rounds at most
    else:
        asyncore.loop()
    print('20 rounds, no error; map: %r' % (asyncore.socket_map,))
except Exception as e:
    print('asyncore.loop() raised %s: %s' % (type(e).__name__, e))
    print('listener still in the map, but nobody runs the loop: %r' % (asyncore.socket_map,))
