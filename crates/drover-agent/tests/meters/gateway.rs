//! A Modbus TCP gateway for tests: a real tokio-modbus server on `127.0.0.1:0` whose holding
//! registers hold meters in slots the way the seed's M-Bus gateways did, with faults that can
//! be switched on per register range, a delay per request, and counters of connections,
//! requests and requests in flight.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response};

/// A seed meter model as the gateway lays it out: (slot offset, energy base, factor).
#[derive(Debug, Clone, Copy)]
pub struct Model {
    pub map: &'static str,
    pub slot_offset: u16,
    pub base: u16,
    pub factor: i64,
}

/// The seed's three models, with the numbers from the seed's manufacturer table.
pub const MODELS: [Model; 3] = [
    Model {
        map: "sec",
        slot_offset: 260,
        base: 260,
        factor: 1,
    },
    Model {
        map: "gav",
        slot_offset: 260,
        base: 20,
        factor: 100,
    },
    Model {
        map: "eastron",
        slot_offset: 130,
        base: 20,
        factor: 10,
    },
];

/// What a faulty register range does.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answers with this exception.
    Exception(ExceptionCode),
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct State {
    holding: Mutex<HashMap<u16, u16>>,
    input: Mutex<HashMap<u16, u16>>,
    faults: Mutex<Vec<(RangeInclusive<u16>, Fault)>>,
    delay: Mutex<Duration>,
    accepts: AtomicUsize,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

pub struct Gateway {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Option<JoinHandle<()>>,
}

impl Gateway {
    /// A gateway with no registers set (every register reads 0).
    pub async fn start() -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let server = Some(serve(listener, state.clone()));
        Gateway {
            addr,
            state,
            server,
        }
    }

    /// Stops serving: the listener and every connection close.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Serves again on the same address, with the same registers.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.server = Some(serve(listener, self.state.clone()));
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sets holding registers from `address` on.
    pub fn set(&self, address: u16, words: &[u16]) {
        let mut holding = self.state.holding.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            holding.insert(address + i as u16, *w);
        }
    }

    /// Sets input registers from `address` on.
    pub fn set_input(&self, address: u16, words: &[u16]) {
        let mut input = self.state.input.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            input.insert(address + i as u16, *w);
        }
    }

    /// Puts a meter's serial number (u32, high word first) into `slot`.
    pub fn serial(&self, model: Model, slot: u16, serial: u32) {
        let at = slot * model.slot_offset + 10;
        self.set(at, &[(serial >> 16) as u16, serial as u16]);
    }

    /// Puts a meter into `slot`: its serial number and its raw 64-bit energy register.
    pub fn meter(&self, model: Model, slot: u16, serial: u32, energy: u64) {
        self.serial(model, slot, serial);
        let at = slot * model.slot_offset + model.base;
        let words: Vec<u16> = (0..4).map(|i| (energy >> (48 - 16 * i)) as u16).collect();
        self.set(at, &words);
    }

    /// The register range of a slot's energy register.
    pub fn energy_range(model: Model, slot: u16) -> RangeInclusive<u16> {
        let at = slot * model.slot_offset + model.base;
        at..=at + 3
    }

    /// Makes requests touching `range` fail with `fault`.
    pub fn fail(&self, range: RangeInclusive<u16>, fault: Fault) {
        self.state.faults.lock().unwrap().push((range, fault));
    }

    pub fn heal(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Every request takes this long to answer.
    pub fn slow_down(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.state.accepts.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn serve(listener: TcpListener, state: Arc<State>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, _addr| {
            let state = state.clone();
            async move {
                state.accepts.fetch_add(1, Ordering::SeqCst);
                Ok(Some((Service { state }, stream)))
            }
        };
        let _ = server.serve(&on_connected, |_error| {}).await;
    })
}

struct Service {
    state: Arc<State>,
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<State>);

impl InFlight {
    fn new(state: &Arc<State>) -> InFlight {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tokio_modbus::server::Service for Service {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, request: Request<'static>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let (input, address, count) = match request {
                Request::ReadHoldingRegisters(a, c) => (false, a, c),
                Request::ReadInputRegisters(a, c) => (true, a, c),
                _ => return Err(ExceptionCode::IllegalFunction),
            };
            state.requests.fetch_add(1, Ordering::SeqCst);
            let _in_flight = InFlight::new(&state);
            let delay = *state.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let last = address
                .checked_add(count.saturating_sub(1))
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            let fault = state
                .faults
                .lock()
                .unwrap()
                .iter()
                .find(|(range, _)| *range.start() <= last && address <= *range.end())
                .map(|(_, fault)| *fault);
            match fault {
                Some(Fault::Exception(code)) => return Err(code),
                Some(Fault::Hang) => std::future::pending::<()>().await,
                None => {}
            }
            let table = if input { &state.input } else { &state.holding };
            let table = table.lock().unwrap();
            let words: Vec<u16> = (address..=last)
                .map(|a| table.get(&a).copied().unwrap_or(0))
                .collect();
            Ok(if input {
                Response::ReadInputRegisters(words)
            } else {
                Response::ReadHoldingRegisters(words)
            })
        })
    }
}
