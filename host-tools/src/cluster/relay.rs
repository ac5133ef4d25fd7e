//! Byte pipes between two stream sockets: the cluster daemon's `relay` (control connection to
//! a node's TCP port) and the front-end's `CONNECT` (client TCP to that relay) both use one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;

/// A stream socket that can be cloned and shut down (TCP or Unix).
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn clone_stream(&self) -> io::Result<Self>;
    fn shut(&self, how: Shutdown);
}

impl Duplex for TcpStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Duplex for UnixStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// Copies the client's bytes to the server and the server's bytes to the client until both
/// directions end; returns then. `client_in` reads the client's side: the socket itself, or a
/// reader that already holds bytes the client sent (they go first).
///
/// The client's end of input half-closes toward the server, whose answers still flow back; the
/// server's end (or either side breaking) shuts both sockets down, which also ends the other
/// direction. No time bound: a silent server that never closes keeps a half-closed pipe open
/// (the nodes' TCP services close idle connections themselves).
pub fn pipe<C: Duplex, S: Duplex>(client_in: impl Read, client: C, server: S) {
    let (server_r, client_w) = match (server.clone_stream(), client.clone_stream()) {
        (Ok(s), Ok(c)) => (s, c),
        _ => {
            client.shut(Shutdown::Both);
            server.shut(Shutdown::Both);
            return;
        }
    };
    let back = thread::Builder::new()
        .name("relay-back".into())
        .spawn(move || {
            let (mut server_r, mut client_w) = (server_r, client_w);
            let _ = io::copy(&mut server_r, &mut client_w);
            let _ = client_w.flush();
            client_w.shut(Shutdown::Both);
            server_r.shut(Shutdown::Both);
        });
    let Ok(back) = back else {
        client.shut(Shutdown::Both);
        server.shut(Shutdown::Both);
        return;
    };
    let mut client_in = client_in;
    let mut server_w = server;
    match io::copy(&mut client_in, &mut server_w) {
        Ok(_) => server_w.shut(Shutdown::Write),
        Err(_) => {
            server_w.shut(Shutdown::Both);
            client.shut(Shutdown::Both);
        }
    }
    let _ = back.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn pipe_carries_both_ways_and_ends_when_the_server_closes() {
        // Server: answers each line upper-cased, closes after "bye".
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            loop {
                let mut line = String::new();
                if io::BufRead::read_line(&mut r, &mut line).unwrap() == 0 {
                    return;
                }
                w.write_all(line.to_uppercase().as_bytes()).unwrap();
                if line.trim() == "bye" {
                    return;
                }
            }
        });
        let (mut client, relay_side) = UnixStream::pair().unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        // Bytes already read from the client before the pipe starts.
        let early = io::Cursor::new(b"early\n".to_vec()).chain(relay_side.try_clone().unwrap());
        let piper = thread::spawn(move || pipe(early, relay_side, tcp));
        client.write_all(b"hello\nbye\n").unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "EARLY\nHELLO\nBYE\n");
        piper.join().unwrap();
        server.join().unwrap();
    }
}
