//! One forwarded connection: a client's data stream joined to a TCP
//! connection to `localhost:<port>` inside the pod's network namespace.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Backend, blocking};
use crate::error::Error;

/// Forwards `data` to the pod's `port` until both sides are done. Errors
/// go to the client on `error` as the JSON kubelet writes; the client's
/// other connections are unaffected.
pub async fn forward<D, E>(
    backend: Arc<dyn Backend>,
    sandbox_id: String,
    port: u16,
    mut data: D,
    mut error: E,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let id = sandbox_id.clone();
    let connected = blocking(move || backend.connect(&id, port))
        .await
        .and_then(|s| {
            s.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(s))
                .map_err(|e| Error::io("register the forwarded connection", e))
        });
    let failure = match connected {
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            join(&mut data, tcp).await.err().map(|e| e.to_string())
        }
        Err(e) => Some(crate::error::chain(&e)),
    };
    if let Some(why) = failure {
        tracing::debug!(sandbox = %sandbox_id, port, error = %why, "port-forward connection failed");
        let message = format!("error forwarding port {port} to pod {sandbox_id}, uid : {why}");
        let body = serde_json::json!({ "message": message }).to_string();
        let _ = error.write_all(body.as_bytes()).await;
        let _ = error.write_all(b"\n").await;
    }
    let _ = error.shutdown().await;
    let _ = data.shutdown().await;
}

/// Copies both ways until the pod's side has closed: a client's end of
/// input only half-closes the connection to the pod, whose answer still
/// comes back, as containerd forwards. A client that resets or leaves ends
/// the connection quietly (client-go resets a data stream once it has its
/// answer); only a failure on the pod's side is reported to the client.
async fn join<D>(data: &mut D, tcp: tokio::net::TcpStream) -> std::io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let (mut from_client, mut to_client) = tokio::io::split(data);
    let upstream = async {
        // 64 KiB at a time both ways (tokio::io::copy's 8 KiB halves the
        // upload rate).
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) => return to_pod.shutdown().await.map(|()| true),
                Ok(n) => {
                    if to_pod.write_all(&buf[..n]).await.is_err() {
                        // The pod stopped reading.
                        return Ok(false);
                    }
                }
                // The client reset its stream.
                Err(_) => return Ok(false),
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_pod.read(&mut buf).await?;
            if n == 0 {
                let _ = to_client.shutdown().await;
                return Ok(());
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                // The client is gone: nobody to tell.
                return Ok(());
            }
        }
    };
    tokio::pin!(upstream);
    let mut upstream_done = false;
    tokio::pin!(downstream);
    loop {
        tokio::select! {
            r = &mut downstream => return r,
            r = &mut upstream, if !upstream_done => {
                match r {
                    // The pod may still answer after the client's EOF.
                    Ok(true) => upstream_done = true,
                    Ok(false) | Err(_) => return Ok(()),
                }
            }
        }
    }
}

/// Parses a port header or query value (`8080`, or `80,443` in a query).
pub fn parse_ports(value: &str) -> Result<Vec<u16>, String> {
    value
        .split(',')
        .map(|p| match p.trim().parse::<u16>() {
            Ok(0) => Err(format!("port {p:?} must be > 0")),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("unable to parse {p:?} as a port")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_as_kubelet_reads_them() {
        assert_eq!(parse_ports("80"), Ok(vec![80]));
        assert_eq!(parse_ports("80,443"), Ok(vec![80, 443]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("65536").is_err());
        assert!(parse_ports("x").is_err());
    }
}
