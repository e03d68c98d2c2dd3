from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForgetMemberRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ForgetMemberResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("node_id", "address", "state", "last_seen_unix_ms", "chunk_count", "bytes_stored")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: str
    last_seen_unix_ms: int
    chunk_count: int
    bytes_stored: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., last_seen_unix_ms: _Optional[int] = ..., chunk_count: _Optional[int] = ..., bytes_stored: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "grpc_address", "p2p_address", "object_count", "chunk_count", "bytes_stored", "members", "repair_backlog", "peak_rss_bytes", "version", "scrub", "writable", "not_ready_reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    P2P_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REPAIR_BACKLOG_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCRUB_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_address: str
    p2p_address: str
    object_count: int
    chunk_count: int
    bytes_stored: int
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    repair_backlog: int
    peak_rss_bytes: int
    version: str
    scrub: ScrubStatus
    writable: bool
    not_ready_reason: str
    def __init__(self, node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., p2p_address: _Optional[str] = ..., object_count: _Optional[int] = ..., chunk_count: _Optional[int] = ..., bytes_stored: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., repair_backlog: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., version: _Optional[str] = ..., scrub: _Optional[_Union[ScrubStatus, _Mapping]] = ..., writable: _Optional[bool] = ..., not_ready_reason: _Optional[str] = ...) -> None: ...

class ScrubStatus(_message.Message):
    __slots__ = ("passes", "checked_this_pass", "checked_total", "corrupt_found", "last_pass_end_unix_ms")
    PASSES_FIELD_NUMBER: _ClassVar[int]
    CHECKED_THIS_PASS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FOUND_FIELD_NUMBER: _ClassVar[int]
    LAST_PASS_END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    passes: int
    checked_this_pass: int
    checked_total: int
    corrupt_found: int
    last_pass_end_unix_ms: int
    def __init__(self, passes: _Optional[int] = ..., checked_this_pass: _Optional[int] = ..., checked_total: _Optional[int] = ..., corrupt_found: _Optional[int] = ..., last_pass_end_unix_ms: _Optional[int] = ...) -> None: ...
