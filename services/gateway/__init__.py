"""The HTTP gateway: county systems (and operators) that cannot speak NATS post submissions and
read their county over HTTPS-fronted HTTP, authenticated by bearer tokens; the gateway forwards
each request to the same NATS subjects a NATS client would use, as its own user ``svc-gateway``.
"""
