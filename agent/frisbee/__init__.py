"""Emulab frisbee, wire-compatible: the UDP multicast protocol that spreads an image to many nodes at once.

packets.py  the datagrams: decode/validate/encode, and which sender to believe (accept_source), pure
server.py   frisbeed's scheduler (work queue, merging, pacing), a sans-I/O engine (agent/sansio.py)
serve.py    the server shell: a file, a socket and the server engine on real time (`nodeagent serve`)
client.py   frisbee's client logic (join, requests, chunk assembly), a sans-I/O engine (agent/sansio.py)
receive.py  the client shell: a frisbee session as a chunk source for `nodeagent image`
net.py      UDP sockets set up as frisbee sets them up (multicast, broadcast, unicast), for both shells
"""
