"""Emulab frisbee, wire-compatible: the UDP multicast protocol that spreads an image to many nodes at once.

packets.py  the datagrams: decode/validate/encode, pure
server.py   frisbeed's scheduler (work queue, merging, pacing), sans-I/O
serve.py    the server shell: a file, a socket and the scheduler on real time (`nodeagent serve`)
client.py   frisbee's client logic (join, requests, chunk assembly), sans-I/O
receive.py  the client shell: a frisbee session as a chunk source for `nodeagent image`
net.py      UDP sockets set up as frisbee sets them up (multicast, broadcast, unicast), for both shells
"""
