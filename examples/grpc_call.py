#!/usr/bin/env python3
"""Call any statehouse RPC with JSON, using only gRPC server reflection (no generated code).

A stand-in for grpcurl, which is not packaged everywhere:

    pip install grpcio grpcio-reflection protobuf
    python3 examples/grpc_call.py 127.0.0.1:50051 statehouse.v1.EntityService/Call \
        '{"type": "counter", "key": "visits", "message": {"op": "incr"}}'

Prints the response as JSON; on error prints the gRPC code and message and exits 1.
"""

import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    target, full_method, body = sys.argv[1:]
    service_name, _, method_name = full_method.rpartition("/")
    with grpc.insecure_channel(target) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(body, request_type())
        rpc = channel.unary_unary(
            f"/{service_name}/{method_name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            response = rpc(request, timeout=10)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        print(json_format.MessageToJson(response, always_print_fields_with_no_presence=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
