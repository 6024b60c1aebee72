//! SPDY/3.1 framing and sessions, as Kubernetes' streaming protocols use
//! them (remotecommand and portforward over an HTTP/1.1 upgrade).
