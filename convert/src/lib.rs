//! The copy engine: any `BlockDevice` to any `BlockDeviceMut`, parallel and sparse-aware (issue 3; empty for now).
