// distill: declarations only (see ../../../README.md)
#pragma once
