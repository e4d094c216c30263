//! Both fakes on one address: `afflio payouts sandbox`, the README's
//! payout example and the tests use it. RazorpayX and PayPal paths do not
//! overlap.

use std::net::SocketAddr;

use crate::{paypal, razorpayx};

/// The fakes' shared states.
#[derive(Clone, Default)]
pub struct Sandbox {
    pub razorpayx: razorpayx::fake::Shared,
    pub paypal: paypal::fake::Shared,
}

impl Sandbox {
    /// Serves both fakes on `addr` (port 0: any free port) in the background.
    pub async fn start(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = razorpayx::fake::router(self.razorpayx.clone()).merge(paypal::fake::router(self.paypal.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(addr)
    }
}
