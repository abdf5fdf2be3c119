//! The journal under SIGKILL: see `crash_test`.
