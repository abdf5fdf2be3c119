//! The journal: resume, lock, frozen inputs, schedule, stop and resume, breakers, status and report.
