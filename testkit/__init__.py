"""What the tests, the benchmark and the scripts share to talk to a served model: test images
(``images``), streaming clients (``streaming``) and the server's Prometheus metrics (``metrics``).

A package of its own so nothing outside tests/ has to import tests/.
"""
