//! Property tests of the guard on the real render path (filled in below).
