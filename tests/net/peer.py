"""The far end of the flow test's veth pair, run inside the test's network namespace.

Serves, on ADDR: a UDP sink on port 9999 (counts datagrams), a TCP server on 8080 (reads
until the client closes), and a DNS responder on UDP 53 that answers every query with
its header's QR bit set (one A record), except the query for `bad.test`, which gets a
truncated answer. Prints "ready", then, when its stdin closes, "udp=<datagrams>".
"""
import socket
import sys
import threading

addr = sys.argv[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((addr, 9999))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((addr, 8080))
tcp.listen()
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind((addr, 53))
count = [0]


def sink():
    while True:
        udp.recv(65536)
        count[0] += 1


def serve_tcp():
    while True:
        c, _ = tcp.accept()
        while c.recv(4096):
            pass
        c.close()


def serve_dns():
    while True:
        q, peer = dns.recvfrom(512)
        if b"\x03bad\x04test" in q:
            # A header that promises one answer, and no answer: a truncated message.
            r = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:]
        else:
            r = (q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:]
                 + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x4d\x00\x63")
        dns.sendto(r, peer)


for f in (sink, serve_tcp, serve_dns):
    threading.Thread(target=f, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
print(f"udp={count[0]}", flush=True)
