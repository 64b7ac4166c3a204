"""Open Inference Protocol (KServe v2, Triton gRPC) modules generated from grpc_service.proto."""
