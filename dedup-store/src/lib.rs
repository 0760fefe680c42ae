//! The content-addressed, deduplicated store of VM disks and memory snapshots (issue 4; empty for now).
