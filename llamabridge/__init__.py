"""What the proxy and the collector share, below both: it imports neither `proxy` nor `collector`.

- `settings`: reading knobs from the environment (one error type, one parser per kind of value).
- `keys`: the API keys file (a salted hash per named key) and its command line.
- `edge`: the WSGI layer in front of both services that refuses browser attacks and checks keys.
"""
