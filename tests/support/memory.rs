//! Resident memory from `/proc`: a process's high-water mark and resetting this process's.

/// A `Vm*` field (`"VmHWM:"`, `"VmRSS:"`) of a `/proc/<pid>/status` text, in MB.
pub fn vm_mb(status: &str, field: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// A `Vm*` field of this process, in MB.
pub fn own_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    vm_mb(&status, field).unwrap()
}

/// Starts this process's high-water mark (`VmHWM`) again from its current size.
pub fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}
