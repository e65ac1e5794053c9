"""ttrpc, containerd's RPC for shims, over asyncio Unix sockets: server and client.

Written from the protocol description of github.com/containerd/ttrpc (the
version containerd 1.6 speaks): every message is a frame of a 10-byte header
(4-byte big-endian payload length, 4-byte big-endian stream id, 1-byte type:
1 request, 2 response, 3 data; 1-byte flags) and a protobuf payload of at most
4 MiB. A request frame carries ttrpc.Request (service, method, the method's
message as bytes, timeout_nano, metadata key/values); the response frame on
the same stream id carries ttrpc.Response (a google.rpc.Status and the reply).
Clients number their streams with odd ids. Only unary calls exist here: that
is all containerd's Task and Events services use.

Behaviour kept from the Go implementation because containerd relies on it or
sees it:
- requests run concurrently, one task each, and responses go out as they
  finish, in any order: a slow Wait must not hold up State;
- a frame over 4 MiB is skipped and answered RESOURCE_EXHAUSTED on its stream,
  and the connection goes on;
- an unknown service or method answers UNIMPLEMENTED ("service X", "method Y");
- a request with an even stream id or an undecodable envelope answers
  INVALID_ARGUMENT and the connection goes on;
- a handler's error becomes the response status: an RpcError subclass gives
  its code, a timeout DEADLINE_EXCEEDED, anything else UNKNOWN with its text;
- the namespace travels as the metadata key "containerd-namespace-ttrpc";
- when a connection ends, its running handlers are cancelled (Go cancels
  their context), so a Wait whose caller went away does not linger.
Stricter than Go, which reads past any frame that is not a request: response
and data frames sent to the server are ignored likewise, but a type outside
1-3 says the peer does not speak ttrpc (or the stream is out of step), so that
connection is closed; the server itself always goes on.
"""

from kata_py.shim.ttrpc.client import Client
from kata_py.shim.ttrpc.errors import (
    Aborted, AlreadyExists, Cancelled, Code, ConnectionClosed, DataLoss, DeadlineExceeded,
    FailedPrecondition, FrameError, Internal, InvalidArgument, NotFound, OutOfRange,
    PermissionDenied, RegistrationError, ResourceExhausted, RpcError, TtrpcError, Unauthenticated,
    Unavailable, Unimplemented, Unknown)
from kata_py.shim.ttrpc.framing import (
    HEADER_LENGTH, MAX_MESSAGE_LENGTH, NAMESPACE_KEY, FrameHeader, MessageType, decode_header,
    encode_header, read_frame)
from kata_py.shim.ttrpc.server import CallContext, ErrorMapper, Handler, Server

__all__ = [
    "Aborted", "AlreadyExists", "CallContext", "Cancelled", "Client", "Code", "ConnectionClosed",
    "DataLoss", "DeadlineExceeded", "ErrorMapper", "FailedPrecondition", "FrameError",
    "FrameHeader", "HEADER_LENGTH", "Handler", "Internal", "InvalidArgument", "MAX_MESSAGE_LENGTH",
    "MessageType", "NAMESPACE_KEY", "NotFound", "OutOfRange", "PermissionDenied",
    "RegistrationError", "ResourceExhausted", "RpcError", "Server", "TtrpcError",
    "Unauthenticated", "Unavailable", "Unimplemented", "Unknown", "decode_header",
    "encode_header", "read_frame",
]
