"""HTTP/1.1, as much as nodeagent needs: a sans-I/O client codec (codec.py), URLs (url.py), a socket shell (client.py).

Not http.client/urllib (they pull email and more into the static binary) and no third-party dependency.
"""
