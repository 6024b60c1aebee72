//! Safe layer unpacking (in progress).
