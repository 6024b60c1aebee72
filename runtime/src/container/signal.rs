//! The signal that stops a container: named in its CRI config
//! (`stop_signal`, KEP-4960), in its image (`StopSignal`), or SIGTERM.

use berth_cri::v1::Signal;

use crate::error::{Error, Result};

/// Linux's first and last real-time signals, as the kernel numbers them
/// (moby and containerd name them RTMIN+n and RTMAX-n from these).
const RTMIN: i32 = 34;
const RTMAX: i32 = 64;

/// A signal by name ("SIGQUIT", "quit", "RTMIN+3") or number, as an image's
/// StopSignal names it.
pub fn parse(name: &str) -> Option<i32> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    if let Ok(n) = name.parse::<i32>() {
        return (1..=RTMAX).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let realtime = |base: i32, offset: &str, sign: i32| {
        let n = base + sign * offset.parse::<i32>().ok()?;
        (RTMIN..=RTMAX).contains(&n).then_some(n)
    };
    match bare {
        "RTMIN" => return Some(RTMIN),
        "RTMAX" => return Some(RTMAX),
        "CLD" => return Some(libc::SIGCHLD),
        "POLL" => return Some(libc::SIGIO),
        "IOT" => return Some(libc::SIGABRT),
        _ => {}
    }
    if let Some(offset) = bare.strip_prefix("RTMIN+") {
        return realtime(RTMIN, offset, 1);
    }
    if let Some(offset) = bare.strip_prefix("RTMAX-") {
        return realtime(RTMAX, offset, -1);
    }
    format!("SIG{bare}")
        .parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// The signal a CRI `Signal` value names; `None` for RUNTIME_DEFAULT (the
/// runtime picks), InvalidArgument for a value the API does not define.
pub fn from_cri(value: i32) -> Result<Option<i32>> {
    let signal = Signal::try_from(value).map_err(|_| {
        Error::InvalidArgument(format!("stop_signal {value} is not a known signal"))
    })?;
    if signal == Signal::RuntimeDefault {
        return Ok(None);
    }
    // Names are SIGTERM, SIGRTMINPLUS3, SIGRTMAXMINUS2, ...
    let name = signal
        .as_str_name()
        .replace("PLUS", "+")
        .replace("MINUS", "-");
    parse(&name).map(Some).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "stop_signal {} has no number on Linux",
            signal.as_str_name()
        ))
    })
}

/// The CRI `Signal` for signal number `signum`, RUNTIME_DEFAULT if none.
pub fn to_cri(signum: i32) -> Signal {
    let name = match signum {
        RTMIN => "SIGRTMIN".to_string(),
        RTMAX => "SIGRTMAX".to_string(),
        n if n > RTMIN && n < RTMIN + 16 => format!("SIGRTMINPLUS{}", n - RTMIN),
        n if n > RTMIN && n < RTMAX => format!("SIGRTMAXMINUS{}", RTMAX - n),
        n => match nix::sys::signal::Signal::try_from(n) {
            Ok(s) => s.as_str().to_string(),
            Err(_) => return Signal::RuntimeDefault,
        },
    };
    Signal::from_str_name(&name).unwrap_or(Signal::RuntimeDefault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(parse("quit"), Some(libc::SIGQUIT));
        assert_eq!(parse("9"), Some(9));
        assert_eq!(parse("RTMIN+3"), Some(37));
        assert_eq!(parse("SIGRTMAX-1"), Some(63));
        assert_eq!(parse("SIGRTMAX-40"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("SIGNOPE"), None);
        assert_eq!(parse("65"), None);
    }

    #[test]
    fn every_cri_signal_maps_to_a_number_and_back() {
        assert_eq!(from_cri(Signal::RuntimeDefault as i32).unwrap(), None);
        assert_eq!(
            from_cri(Signal::Sigterm as i32).unwrap(),
            Some(libc::SIGTERM)
        );
        assert_eq!(from_cri(Signal::Sigrtminplus1 as i32).unwrap(), Some(35));
        assert_eq!(from_cri(Signal::Sigrtmaxminus1 as i32).unwrap(), Some(63));
        assert!(matches!(from_cri(999), Err(Error::InvalidArgument(_))));
        for value in 1..=65 {
            let signum = from_cri(value).unwrap().expect("a number");
            let back = to_cri(signum);
            // Aliases (SIGCLD, SIGIOT, SIGPOLL) come back as their
            // canonical names; everything else as itself.
            assert_eq!(from_cri(back as i32).unwrap(), Some(signum), "{value}");
        }
        assert_eq!(to_cri(libc::SIGKILL), Signal::Sigkill);
        assert_eq!(to_cri(0), Signal::RuntimeDefault);
    }
}
