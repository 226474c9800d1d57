//! labdesk: a small lab web app a student would use, with in-memory session
//! state (notes and a command history). After a migration the notes are still
//! there, or the migration lost the session.
//!
//! Std only, with a hand-written minimal HTTP/1.1 server on std::net: the app
//! must be one static, dependency-free binary that runs in a scratch image.
//!
//! Env: LABDESK_PORT (8080).
//!   GET  /          HTML page
//!   GET  /state     {"pid":..,"started_unix_ms":..,"notes":[..],"history":[..]}
//!   GET  /notes     [{"id":1,"unix_ms":..,"text":".."}]
//!   POST /notes     body: {"text":".."} or plain text
//!   GET  /history   [{"id":1,"unix_ms":..,"command":".."}]
//!   POST /history   body: {"command":".."} or plain text

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>labdesk</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}li{margin:.2em 0}code{background:#eee}</style></head>
<body><h1>labdesk</h1><p id="who"></p>
<h2>Notes</h2><form id="nf"><input id="note" size="40" placeholder="a note"> <button>add</button></form><ul id="notes"></ul>
<h2>Command history</h2><form id="hf"><input id="cmd" size="40" placeholder="a command you ran"> <button>add</button></form><ul id="history"></ul>
<script>
async function load(){const s=await (await fetch('/state')).json();
document.getElementById('who').textContent='session of pid '+s.pid+', started '+new Date(s.started_unix_ms).toISOString();
const fill=(id,items,key)=>{const ul=document.getElementById(id);ul.innerHTML='';for(const i of items){const li=document.createElement('li');li.textContent=i[key];ul.appendChild(li);}};
fill('notes',s.notes,'text');fill('history',s.history,'command');}
async function post(path,key,input){const v=document.getElementById(input);if(!v.value)return;
await fetch(path,{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify({[key]:v.value})});v.value='';load();}
document.getElementById('nf').onsubmit=e=>{e.preventDefault();post('/notes','text','note')};
document.getElementById('hf').onsubmit=e=>{e.preventDefault();post('/history','command','cmd')};
load();
</script></body></html>
"#;

struct Entry {
    id: u64,
    unix_ms: u64,
    text: String,
}

struct Session {
    pid: u32,
    started_unix_ms: u64,
    notes: Vec<Entry>,
    history: Vec<Entry>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[Entry], key: &str) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|e| format!("{{\"id\":{},\"unix_ms\":{},\"{key}\":{}}}", e.id, e.unix_ms, json_string(&e.text)))
        .collect();
    format!("[{}]", parts.join(","))
}

/// The string value of `key` in a flat JSON object, or the whole body as plain text.
fn field(body: &str, key: &str) -> Option<String> {
    let body = body.trim();
    if !body.starts_with('{') {
        return (!body.is_empty()).then(|| body.to_string());
    }
    let start = body.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = body[start..].trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                }
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
    None
}

fn main() {
    sigterm::exit_on_term();
    let port: u16 = std::env::var("LABDESK_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let session = Arc::new(Mutex::new(Session {
        pid: std::process::id(),
        started_unix_ms: unix_ms(),
        notes: Vec::new(),
        history: Vec::new(),
    }));
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("labdesk: cannot listen on 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    {
        let s = session.lock().unwrap();
        println!("labdesk: started pid={} started_unix_ms={} port={port}", s.pid, s.started_unix_ms);
    }
    for conn in listener.incoming().flatten() {
        let session = Arc::clone(&session);
        std::thread::spawn(move || serve(conn, &session));
    }
}

fn serve(mut conn: TcpStream, session: &Mutex<Session>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut length = 0usize;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        line.clear();
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body = String::from_utf8_lossy(&body);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
    let (status, ctype, out) = match (method, path) {
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        ("GET", "/state") => (
            "200 OK",
            "application/json",
            format!(
                "{{\"pid\":{},\"started_unix_ms\":{},\"notes\":{},\"history\":{}}}\n",
                s.pid,
                s.started_unix_ms,
                list(&s.notes, "text"),
                list(&s.history, "command")
            ),
        ),
        ("GET", "/notes") => ("200 OK", "application/json", list(&s.notes, "text") + "\n"),
        ("GET", "/history") => ("200 OK", "application/json", list(&s.history, "command") + "\n"),
        ("POST", "/notes") | ("POST", "/history") => {
            let (key, notes) = if path == "/notes" { ("text", true) } else { ("command", false) };
            match field(&body, key) {
                Some(text) => {
                    let items = if notes { &mut s.notes } else { &mut s.history };
                    let entry = Entry { id: items.len() as u64 + 1, unix_ms: unix_ms(), text };
                    println!("labdesk: {} #{} {}", &path[1..], entry.id, json_string(&entry.text));
                    let out = format!(
                        "{{\"id\":{},\"unix_ms\":{},\"{key}\":{}}}\n",
                        entry.id,
                        entry.unix_ms,
                        json_string(&entry.text)
                    );
                    items.push(entry);
                    ("201 Created", "application/json", out)
                }
                None => (
                    "400 Bad Request",
                    "application/json",
                    format!("{{\"error\":\"body needs a JSON string field {key:?} or plain text\"}}\n"),
                ),
            }
        }
        (_, "/" | "/state" | "/notes" | "/history") => {
            ("405 Method Not Allowed", "text/plain", "method not allowed\n".into())
        }
        _ => ("404 Not Found", "text/plain", "not found: try /, /state, /notes, /history\n".into()),
    };
    drop(s);
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
        out.len()
    );
}

/// Exit at once on SIGTERM/SIGINT. As PID 1 of a container the process gets no
/// default signal actions, so without a handler `docker stop` waits 10 s and
/// kills it. std has no signal API; the C library's `signal` (which std links
/// anyway) is enough for "exit now" and keeps the app free of dependencies.
#[allow(unsafe_code)]
mod sigterm {
    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }
    extern "C" fn on_term(_: i32) {
        // SAFETY: _exit is async-signal-safe and takes no pointers; nothing needs
        // flushing (stdout is line-buffered).
        unsafe { _exit(0) }
    }
    pub fn exit_on_term() {
        // SAFETY: on_term is an `extern "C" fn(i32)` that only calls _exit, the
        // handler signal(2) expects; SIGTERM and SIGINT may be caught.
        unsafe {
            signal(15, on_term);
            signal(2, on_term);
        }
    }
}
