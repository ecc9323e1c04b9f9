"""The request bodies of the REST service (pydantic models, so the OpenAPI document is the implementation)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

HOST_ID = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
HostId = Annotated[str, StringConstraints(pattern=HOST_ID)]
DomainName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,100}$")]
DomcapsName = Annotated[str, StringConstraints(pattern=r"^domcaps-[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,100}\.xml$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainRequest(_Body):
    domain: str = Field(description="the domain XML, as a string")
    profiles: list[str] = Field(
        default=[], max_length=64, description="profile names (NAME or NAME@VERSION) from the server's library"
    )
    os: str | None = Field(default=None, max_length=512, description="the guest OS: osinfo short id or URI")
    guest_support: Literal["strict", "lenient"] = "strict"
    host: str | None = Field(default=None, pattern=HOST_ID, description="a loaded host's id (default: the first)")


class SolveRequest(DomainRequest):
    complete: bool | None = Field(default=None, description="override the completeness rule")
    refresh: bool = Field(default=False, description="re-decide what earlier solves decided")


class ExplainRequest(DomainRequest):
    complete: bool | None = None
    max_conflicts: int = Field(default=10, ge=1, le=100)


class CheckRequest(DomainRequest):
    max_conflicts: int = Field(default=10, ge=1, le=100)


class DeviceRequest(DomainRequest):
    device: str = Field(description="the device element's XML, as a string")
    node: int | None = Field(default=None, ge=0, le=1023, description="the guest NUMA node")
    policy: Literal["required", "preferred", "legacy", "socket"] = "required"


ProfileFileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,100}\.(toml|xml)$")]


class ProfileCheckRequest(_Body):
    profiles: dict[ProfileFileName, str] = Field(
        min_length=1, max_length=16, description="file name (NAME.toml or NAME.xml) -> the profile's text"
    )


class WhatifRequest(_Body):
    profiles: list[str] = Field(
        default=[], max_length=16, description="the optional profiles (default: the whole library)"
    )
    oses: list[str] = Field(default=["fedora37", "rhel6.10", "win10"], min_length=1, max_length=8)
    domain: str | None = Field(default=None, description="the domain template (default: a typical partial domain)")
    hosts: list[HostId] = Field(default=[], max_length=16, description="loaded host ids (default: the default host)")
    guest_support: Literal["strict", "lenient"] = "strict"


class PlanHostsRequest(_Body):
    domain: str
    profiles: list[str] = Field(default=[], max_length=64)
    os: str | None = Field(default=None, max_length=512)
    guest_support: Literal["strict", "lenient"] = "strict"
    hosts: list[Annotated[str, StringConstraints(pattern=HOST_ID)]] = Field(
        default=[], max_length=1024, description="the fleet: loaded host ids (default: every loaded host)"
    )


class CompareSide(_Body):
    host: HostId | None = Field(default=None, description="a loaded host's id (default: the first)")
    os: str | None = Field(default=None, max_length=512, description="the guest OS (default: each domain's own)")


class WhatifCompareRequest(_Body):
    domains: dict[DomainName, str] = Field(
        min_length=1, max_length=10_000, description="name -> domain XML (templates or complete domains)"
    )
    before: CompareSide = Field(default_factory=CompareSide)
    after: CompareSide = Field(default_factory=CompareSide, description="must differ from before in host or os")


class PlanCommonRequest(_Body):
    domain: str
    profiles: list[str] = Field(default=[], max_length=64)
    os: str | None = Field(default=None, max_length=512)
    guest_support: Literal["strict", "lenient"] = "strict"
    hosts: list[HostId] = Field(
        default=[], max_length=1024, description="the fleet: loaded host ids (default: every loaded host)"
    )
    min_hosts: int | None = Field(
        default=None, ge=1, le=1_000_000, description="plan for the best set of at least this many hosts"
    )


class PlanMigrateRequest(_Body):
    domain: str = Field(description="the running domain's XML (virsh dumpxml)")
    from_: HostId | None = Field(default=None, alias="from", description="the loaded host it runs on")
    to: list[HostId] = Field(
        default=[], max_length=1024, description="destination host ids (default: every loaded host)"
    )
    os: str | None = Field(default=None, max_length=512)


class UsageRow(_Body):
    cpus: float = Field(default=0, ge=0, le=1e9, description="vCPUs already allocated")
    memory_mib: float = Field(default=0, ge=0, le=1e12, description="guest memory already allocated (MiB)")


class PlanCapacityRequest(_Body):
    templates: dict[DomainName, str] = Field(min_length=1, max_length=256, description="name -> domain template XML")
    hosts: list[HostId] = Field(
        default=[], max_length=1024, description="the fleet: loaded host ids (default: every loaded host)"
    )
    os: str | None = Field(default=None, max_length=512)
    cpu_ratio: float = Field(default=1.0, gt=0, le=1000, description="vCPUs per host CPU (Nova's ratio)")
    ram_ratio: float = Field(default=1.0, gt=0, le=1000, description="guest memory per host memory")
    usage: dict[HostId, UsageRow] = Field(default={}, max_length=1024, description="current use, per named host")


class JobInfo(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed"]
    progress: dict[str, int] = Field(
        description="{done, total}: tasks (what-if cells, domains, batches of host classes; 1 for the other jobs); "
        "total is 0 until the job says"
    )
    elapsed_s: float
    result: dict[str, Any] | None = Field(description="when done: the CLI's --format json document")
    problem: dict[str, Any] | None = Field(description="when failed: the problem details")


class HostBundle(_Body):
    capabilities: str = Field(description="`virsh capabilities` XML")
    domcapabilities: list[str] | dict[DomcapsName, str] = Field(
        min_length=1,
        max_length=64,
        description="`virsh domcapabilities` XML, each; or file name -> XML, as `virtpolicy host capture` names "
        "them (the names enter the fingerprint)",
    )
    nodedev: str | None = Field(default=None, description="`virsh nodedev-list --cap pci` dumps (nodedev-pci.xml)")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    location: str | None = Field(default=None, description="400: the XPath, file:line or body member at fault")
    input: str | None = Field(default=None, description="400: the input at fault")
    line: int | None = None


class ConflictProblem(Problem):
    """422: the request's requirements cannot all hold."""

    conflicts: list[dict[str, Any]] = Field(description="minimal conflicting sets: {id, members: [Requirement]}")
    background: list[dict[str, Any]] = Field(description="the libvirt/QEMU facts the sets rely on")
    corrections: list[dict[str, Any]] = Field(description="minimal corrections: {id, cost, drop, actions}")
    result: dict[str, Any] = Field(description="the CLI's --format json document (docs/json-schema.md)")


class HostInfo(BaseModel):
    id: str
    fingerprint: str
    arch: str
    uploaded: bool


class ProfileInfo(BaseModel):
    name: str
    version: str | None = None
    description: str | None = None
    digest: str | None = None
    error: str | None = Field(default=None, description="why the profile cannot be used")


class ProfileDetail(BaseModel):
    name: str
    version: str
    description: str
    digest: str
    use_when: str
    rules: int
    summary: list[str] = Field(description="what `virtpolicy profiles show` prints, line by line")


class Load(BaseModel):
    in_flight: int = Field(description="requests running in a worker")
    waiting: int = Field(description="requests waiting for a worker")
    queue: int = Field(description="the most requests that may wait; more are answered 429")
    jobs_unfinished: int = Field(description="jobs queued or running")
    job_queue: int = Field(description="the most unfinished jobs; more are answered 429")
    workers_replaced: int = Field(description="workers replaced after a time bound or a death, since the start")


class ServiceInfo(BaseModel):
    version: str
    engine_version: str
    api: str
    hosts: list[HostInfo]
    default_host: str
    profile_library_digest: str
    workers: int
    load: Load


class Health(BaseModel):
    status: Literal["ok"]
