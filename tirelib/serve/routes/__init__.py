"""The server's routes, one module per protocol: health and metrics, TensorFlow Serving's REST
API (``/v1``), and the Open Inference Protocol (``/v2``, KServe and Triton)."""
