//! The Application Agent's end of a node's client port (`unipeer_node::jobs::client`): user
//! authentication on the pre-shared key, then sealed request/reply frames.

use std::fmt;
use std::io::{Read, Write};

use unipeer_node::auth::UserCredential;
use unipeer_node::auth::stream::{FrameReader, StreamRole, StreamSealer, frame};
use unipeer_node::auth::user_auth::UserAuthClient;
use unipeer_node::id::{Key, NodeId};
use unipeer_node::jobs::chunk::ChunkId;
use unipeer_node::jobs::client::{
    CLIENT_STREAM_CONTEXT, ClientErrorCode, ClientReply, ClientRequest, MAX_CLIENT_FRAME,
    MAX_RECORD_KEYS, RecordAnswer, SubmitRequest,
};
use unipeer_node::jobs::record::JobId;

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The connection broke or timed out.
    Io(std::io::Error),
    /// The node refused the request.
    Node { code: ClientErrorCode, text: String },
    /// Authentication failed (wrong key, unknown user, a node that cannot serve this user).
    Auth(String),
    /// The node answered something that does not fit (undecodable, unsealed, another reply).
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "connection to the node failed: {e}"),
            ClientError::Node { code, text } => write!(f, "node refused ({code:?}): {text}"),
            ClientError::Auth(t) => write!(f, "authentication failed: {t}"),
            ClientError::Protocol(t) => write!(f, "protocol error: {t}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// How an authentication error starts when the node's proof does not verify under the user's
/// key (so no node of this cluster will accept it).
pub const PROOF_FAILED: &str = "the node's proof";

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: NodeId,
    pub joined: bool,
    pub apps: Vec<String>,
    pub slots: u8,
    pub running: u8,
}

/// A session with one node's client port.
pub struct JobClient<S: Read + Write> {
    stream: S,
    reader: FrameReader,
    sealer: Option<StreamSealer>,
    /// The node this session is with.
    pub node: NodeId,
    /// Whether the session is authenticated and sealed (false only with a node launched
    /// without trust material).
    pub authenticated: bool,
    /// Payload bytes sent and received (framing and seals included).
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// 32 bytes from the OS's random source.
fn fresh_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS random source works");
    n
}

impl<S: Read + Write> JobClient<S> {
    /// Authenticates as `credential`'s user over `stream` (with read/write timeouts set by the
    /// caller).
    pub fn connect(stream: S, credential: &UserCredential) -> Result<Self> {
        let mut c = JobClient {
            stream,
            reader: FrameReader::new(MAX_CLIENT_FRAME),
            sealer: None,
            node: NodeId::default(),
            authenticated: false,
            bytes_out: 0,
            bytes_in: 0,
        };
        // A fresh nonce and a fresh ephemeral X25519 key per session: the session key comes
        // from the pre-shared key and the Diffie-Hellman secret (forward secrecy).
        let (auth, hello) = UserAuthClient::start(credential.clone(), fresh_nonce(), fresh_nonce());
        c.send(&ClientRequest::Auth(hello))?;
        match c.recv()? {
            ClientReply::Auth(challenge) => {
                let (proof, node, key) = auth
                    .on_challenge(&challenge)
                    .map_err(|e| ClientError::Auth(format!("{PROOF_FAILED}: {e:?}")))?;
                c.send(&ClientRequest::Auth(proof))?;
                c.sealer = Some(StreamSealer::new(
                    &key,
                    CLIENT_STREAM_CONTEXT,
                    StreamRole::Initiator,
                ));
                match c.recv()? {
                    ClientReply::Ready {
                        node: n,
                        authenticated: true,
                    } if n == node => {
                        c.node = node;
                        c.authenticated = true;
                    }
                    ClientReply::Error { text, .. } => return Err(ClientError::Auth(text)),
                    other => {
                        return Err(ClientError::Protocol(format!(
                            "expected Ready, got {other:?}"
                        )));
                    }
                }
            }
            ClientReply::Ready {
                node,
                authenticated: false,
            } => {
                c.node = node;
            }
            ClientReply::Error { text, .. } => return Err(ClientError::Auth(text)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected a challenge, got {other:?}"
                )));
            }
        }
        Ok(c)
    }

    fn send(&mut self, req: &ClientRequest) -> Result<()> {
        let plain = req.encode();
        let body = match self.sealer.as_mut() {
            Some(s) => s
                .seal(&plain)
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
            None => plain,
        };
        let f = frame(&body);
        self.stream.write_all(&f)?;
        self.stream.flush()?;
        self.bytes_out += f.len() as u64;
        Ok(())
    }

    fn recv(&mut self) -> Result<ClientReply> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.reader.next_frame() {
                Ok(Some(mut body)) => {
                    self.bytes_in += body.len() as u64 + 4;
                    let plain = match self.sealer.as_mut() {
                        Some(s) => {
                            let n = s
                                .open(&mut body)
                                .map_err(|e| ClientError::Protocol(e.to_string()))?;
                            body.truncate(n);
                            body
                        }
                        None => body,
                    };
                    return ClientReply::decode(&plain)
                        .map_err(|e| ClientError::Protocol(e.to_string()));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let want = self.reader.wants().min(buf.len());
            let n = self.stream.read(&mut buf[..want])?;
            if n == 0 {
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the node closed the connection",
                )));
            }
            self.reader.push(&buf[..n]);
        }
    }

    fn call(&mut self, req: &ClientRequest) -> Result<ClientReply> {
        self.send(req)?;
        match self.recv()? {
            ClientReply::Error { code, text } => Err(ClientError::Node { code, text }),
            r => Ok(r),
        }
    }

    pub fn ping(&mut self) -> Result<NodeInfo> {
        match self.call(&ClientRequest::Ping)? {
            ClientReply::Pong {
                node,
                joined,
                apps,
                slots,
                running,
            } => Ok(NodeInfo {
                node,
                joined,
                apps,
                slots,
                running,
            }),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// Stores an input chunk at this node (which uploads it to its root).
    pub fn put_chunk(&mut self, data: &[u8]) -> Result<ChunkId> {
        let want = Key::for_content(data);
        match self.call(&ClientRequest::PutChunk {
            data: data.to_vec(),
        })? {
            ClientReply::ChunkStored { id } if id == want => Ok(id),
            other => Err(unexpected("ChunkStored", &other)),
        }
    }

    /// Stores the job's task records; answers once every record is stored.
    pub fn submit(&mut self, req: &SubmitRequest) -> Result<JobId> {
        match self.call(&ClientRequest::Submit(req.clone()))? {
            ClientReply::Submitted { job } => Ok(job),
            other => Err(unexpected("Submitted", &other)),
        }
    }

    /// Reads records from the DHT (any number of keys; asked in batches).
    pub fn records(&mut self, keys: &[Key]) -> Result<Vec<(Key, RecordAnswer)>> {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_RECORD_KEYS) {
            match self.call(&ClientRequest::Records {
                keys: batch.to_vec(),
            })? {
                ClientReply::Records(r) if r.len() == batch.len() => out.extend(r),
                other => return Err(unexpected("Records", &other)),
            }
        }
        Ok(out)
    }

    /// Fetches a chunk and checks it against its id.
    pub fn fetch(&mut self, id: ChunkId) -> Result<Vec<u8>> {
        match self.call(&ClientRequest::Fetch { id })? {
            ClientReply::Chunk { id: got, data } if got == id => {
                if Key::for_content(&data) != id {
                    return Err(ClientError::Protocol(format!(
                        "chunk {id} does not hash to its id"
                    )));
                }
                Ok(data)
            }
            other => Err(unexpected("Chunk", &other)),
        }
    }

    /// Asks every task's root to cancel it; answers how many were asked.
    pub fn cancel(&mut self, job: JobId, tasks: &[Key]) -> Result<u16> {
        match self.call(&ClientRequest::Cancel {
            job,
            tasks: tasks.to_vec(),
        })? {
            ClientReply::Cancelled { tasks, .. } => Ok(tasks),
            other => Err(unexpected("Cancelled", &other)),
        }
    }
}

fn unexpected(want: &str, got: &ClientReply) -> ClientError {
    let mut text = format!("{got:?}");
    text.truncate(200);
    ClientError::Protocol(format!("expected {want}, got {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use unipeer_node::auth::user_auth::UserAuthResponder;
    use unipeer_node::auth::{Allowance, IdentityKey, UserEntry, UserList};
    use unipeer_node::jobs::client::ClientRequest as Req;

    /// A node's side of the protocol, enough to exercise the client: authenticates on the list,
    /// then answers Ping, PutChunk and Fetch (a `Fetch` of `bad` answers bytes of another id).
    fn fake_node(mut s: UnixStream, psk: [u8; 32], bad: Key) {
        let authority = IdentityKey::from_seed(&[1; 32]);
        let users = UserList::issue(
            1,
            0,
            vec![UserEntry {
                name: "alice".into(),
                allowed: vec![Allowance::AnyPeer],
            }],
            &authority,
        );
        let creds = [UserCredential {
            user: "alice".into(),
            psk,
        }];
        let node = NodeId::default();
        let mut reader = FrameReader::new(MAX_CLIENT_FRAME);
        let mut buf = [0u8; 4096];
        let mut next = |s: &mut UnixStream, reader: &mut FrameReader| loop {
            if let Ok(Some(f)) = reader.next_frame() {
                return Some(f);
            }
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            reader.push(&buf[..n]);
        };
        let hello = next(&mut s, &mut reader).unwrap();
        let Ok(Req::Auth(hello)) = ClientRequest::decode(&hello) else {
            panic!("expected a Hello")
        };
        let (resp, challenge) = match UserAuthResponder::on_hello(
            &hello,
            node,
            "s1",
            &users,
            creds.first(),
            [9; 32],
            [10; 32],
        ) {
            Ok(a) => a,
            Err(e) => {
                let r = ClientReply::Error {
                    code: ClientErrorCode::Auth,
                    text: format!("{e:?}"),
                };
                let _ = s.write_all(&frame(&r.encode()));
                return;
            }
        };
        s.write_all(&frame(&ClientReply::Auth(challenge).encode()))
            .unwrap();
        let proof = next(&mut s, &mut reader).unwrap();
        let Ok(Req::Auth(proof)) = ClientRequest::decode(&proof) else {
            panic!("expected a Proof")
        };
        let Ok(key) = resp.on_proof(&proof) else {
            let r = ClientReply::Error {
                code: ClientErrorCode::Auth,
                text: "bad proof".into(),
            };
            let _ = s.write_all(&frame(&r.encode()));
            return;
        };
        let mut sealer = StreamSealer::new(&key, CLIENT_STREAM_CONTEXT, StreamRole::Responder);
        let reply = |s: &mut UnixStream, r: ClientReply, sealer: &mut StreamSealer| {
            let _ = s.write_all(&frame(&sealer.seal(&r.encode()).unwrap()));
        };
        reply(
            &mut s,
            ClientReply::Ready {
                node,
                authenticated: true,
            },
            &mut sealer,
        );
        let mut held: Vec<Vec<u8>> = Vec::new();
        while let Some(mut f) = next(&mut s, &mut reader) {
            let n = sealer.open(&mut f).expect("the client seals every request");
            let r = match ClientRequest::decode(&f[..n]).unwrap() {
                Req::Ping => ClientReply::Pong {
                    node,
                    joined: true,
                    apps: vec!["primes".into()],
                    slots: 2,
                    running: 0,
                },
                Req::PutChunk { data } => {
                    let id = Key::for_content(&data);
                    held.push(data);
                    ClientReply::ChunkStored { id }
                }
                Req::Fetch { id } if id == bad => ClientReply::Chunk {
                    id,
                    data: b"not it".to_vec(),
                },
                Req::Fetch { id } => match held.iter().find(|d| Key::for_content(d) == id) {
                    Some(d) => ClientReply::Chunk {
                        id,
                        data: d.clone(),
                    },
                    None => ClientReply::Error {
                        code: ClientErrorCode::Timeout,
                        text: "no such chunk".into(),
                    },
                },
                other => panic!("unexpected {other:?}"),
            };
            reply(&mut s, r, &mut sealer);
        }
    }

    fn session(client_psk: [u8; 32]) -> Result<JobClient<UnixStream>> {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let bad = Key::for_name(b"bad");
        std::thread::spawn(move || fake_node(b, [5; 32], bad));
        JobClient::connect(
            a,
            &UserCredential {
                user: "alice".into(),
                psk: client_psk,
            },
        )
    }

    #[test]
    fn authenticates_then_speaks_sealed() {
        let mut c = session([5; 32]).unwrap();
        assert!(c.authenticated);
        assert_eq!(c.ping().unwrap().apps, vec!["primes".to_string()]);
        let data = vec![7u8; 70_000.min(MAX_CLIENT_FRAME - 1100)];
        let id = c.put_chunk(&data).unwrap();
        assert_eq!(c.fetch(id).unwrap(), data);
        // A chunk whose bytes do not hash to its id is refused by the client.
        let err = c.fetch(Key::for_name(b"bad")).unwrap_err();
        assert!(err.to_string().contains("does not hash"), "{err}");
        // A node refusal is a clear error, and the session goes on.
        let err = c.fetch(Key::for_name(b"missing")).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Node {
                    code: ClientErrorCode::Timeout,
                    ..
                }
            ),
            "{err}"
        );
        assert!(c.ping().is_ok());
    }

    #[test]
    fn a_wrong_key_fails_authentication() {
        let err = session([6; 32]).err().expect("wrong key refused");
        assert!(matches!(err, ClientError::Auth(_)), "{err}");
    }
}
