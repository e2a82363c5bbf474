"""The host CPU as /proc/cpuinfo describes it: what the decode path's matmul choices and the
benchmarks' `machine` entry read."""

from __future__ import annotations

import re


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpuinfo.read()
    except OSError:
        return ""


def cpu_description(cpuinfo: str) -> dict:
    """The CPU that `cpuinfo` (the text of /proc/cpuinfo) describes: its model name, family and
    model numbers (these tell CPU generations apart where the name does not, e.g. AMD's 25 for
    Zen 4 and 26 for Zen 5) and whether it has AVX-512; empty where the text says nothing."""
    fields = dict(re.findall(r"^(model name|cpu family|model|flags)\s*:\s*(.*?)\s*$", cpuinfo, re.MULTILINE))
    if not fields:
        return {}
    number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None
    return {"cpu": fields.get("model name"), "cpu_family": number("cpu family"), "cpu_model": number("model"),
            "avx512": "avx512f" in fields.get("flags", "").split()}
