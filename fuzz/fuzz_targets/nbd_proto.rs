//! Fuzz the NBD wire parsers (fuse-mount `nbd::proto`): option headers and option data from the
//! handshake, request headers from transmission. The first byte picks which; the rest is a
//! stream of messages as a client would send them. Errors are expected; a panic, or a parsed
//! value that breaks a cap, is a finding.
#![no_main]

use fuse_mount::nbd::proto::{self, OptionRequest};
use libfuzzer_sys::fuzz_target;

fn options(mut data: &[u8]) {
    while let Some((header, rest)) = data.split_first_chunk::<{ proto::OPTION_HEADER_LEN }>() {
        // Also reach the option parsers when the magic is wrong.
        let (option, len) = match proto::parse_option_header(header) {
            Ok(h) => (h.option, h.len as usize),
            Err(_) => (
                u32::from_be_bytes([header[8], header[9], header[10], header[11]]),
                usize::from(header[15]),
            ),
        };
        let (body, rest) = rest.split_at(len.min(rest.len()));
        match proto::parse_option(option, body) {
            Ok(OptionRequest::Info(r) | OptionRequest::Go(r)) => {
                assert!(r.name.len() <= proto::MAX_STRING);
                assert!(r.requests.len() <= usize::from(proto::MAX_INFO_REQUESTS));
            }
            Ok(OptionRequest::ListMetaContext(r) | OptionRequest::SetMetaContext(r)) => {
                assert!(r.name.len() <= proto::MAX_STRING);
                assert!(r.queries.len() <= proto::MAX_META_QUERIES as usize);
                assert!(r.queries.iter().all(|q| q.len() <= proto::MAX_STRING));
            }
            Ok(OptionRequest::ExportName(name)) => assert!(name.len() <= proto::MAX_STRING),
            Ok(_) => {}
            Err(e) => {
                let mut out = Vec::new();
                proto::put_option_error(&mut out, option, proto::rep::ERR_INVALID, &e.0);
                assert!(out.len() <= 20 + proto::MAX_ERROR_MESSAGE);
            }
        }
        data = rest;
    }
}

fn requests(mut data: &[u8]) {
    while let Some((header, rest)) = data.split_first_chunk::<{ proto::REQUEST_LEN }>() {
        if let Ok(r) = proto::parse_request(header) {
            let _ = r.command.allowed_flags();
            let _ = r.end();
            let _ = r.command.to_string();
            // Only a WRITE carries a payload, and its length is the request's.
            let payload = r.payload_len() as usize;
            let (_, after) = rest.split_at(payload.min(rest.len()));
            data = after;
            continue;
        }
        data = rest;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        options(rest);
    } else {
        requests(rest);
    }
});
